"""Checks before anything starts: every model and data reference of a run resolves, the instruct pair shares a
tokenizer, the trackers of `report-to` are installed, and a differential-privacy plan stays within its target.
`check-config`, `simulate`, `compare` and `deploy-local` run them in seconds, before Flower, Ray or any model weights
load; the ServerApp repeats its own checks for plain `flwr run`.

Each failure is a ConfigError naming the key and its value. Built-in models are always available (built on first
use); hub models and datasets are checked against the local cache when `HF_HUB_OFFLINE=1`, and left to the run
otherwise (checking them would download them).
"""

from __future__ import annotations

import os
from pathlib import Path

from fedpt_app.algorithms import INSTRUCT
from fedpt_app.config import ConfigError, RunConfig
from fedpt_app.datafiles import DatasetError
from fedpt_app.models.loading import ModelLoadError, check_model_ref
from fedpt_app.serving import is_remote_ref

LOCAL_DATA = (".jsonl", ".json", ".csv")
LOCAL_SETS = ("rotten-tomatoes", "digits")  # classification sets shipped in installed packages


def preflight(config: RunConfig, num_nodes: int | None = None) -> None:
    """`num_nodes`, where known (simulation), gives the privacy plan the real sampling rate: `fraction-train` of the
    nodes, at least `min-train-nodes`."""
    if config.family.name == INSTRUCT:
        models = {"small-model": config.instruct.small_model, "large-model": config.instruct.large_model}
    else:
        models = {"foundation-model": config.classify.foundation_model}
    for key, ref in models.items():
        if key == "large-model" and is_remote_ref(ref):
            _check_remote(ref)
            continue
        try:
            check_model_ref(ref)
        except ModelLoadError as error:
            raise ConfigError(f"{key}={ref!r}: {error}") from None
    for key, ref in {"dataset": config.data.dataset, "test-dataset": config.data.test_dataset}.items():
        if ref:
            _check_dataset(key, ref, config)
    if config.family.name == INSTRUCT:
        _check_pair(models["small-model"], models["large-model"])
    else:
        _check_modality(config.classify.foundation_model, config.data.dataset)
    if config.evaluation.reporters():
        from fedpt_app.federation.tracking import check_trackers

        check_trackers(config.evaluation.reporters())
    if config.privacy.dp_target_epsilon:
        from fedpt_app.federation.privacy import PrivacyBudget
        from fedpt_app.federation.schedule import sample_size

        federation = config.federation
        rate = federation.fraction_train
        if num_nodes:
            rate = min(sample_size(num_nodes, rate, federation.min_train_nodes), num_nodes) / num_nodes
        PrivacyBudget(config.privacy).check_plan(federation.num_server_rounds, rate)


def _check_remote(ref: str) -> None:
    """A service's address and token, checked here; its tokenizer is checked when the ServerApp connects."""
    from fedpt_app.serving.remote import RemoteModelError, checked_url, token_from_environment

    try:
        checked_url(ref)
        token_from_environment(ref)
    except RemoteModelError as error:
        raise ConfigError(str(error)) from None


def _check_dataset(key: str, ref: str, config: RunConfig) -> None:
    """Local files are read (a malformed row is named now); the built-in and packaged sets always exist."""
    try:
        if config.family.name == INSTRUCT:
            from fedpt_app.instruct.data import EVALUATION_SETS, load_splits

            if ref in EVALUATION_SETS:
                return
            if ref in ("builtin", "world-facts") or Path(ref).suffix in LOCAL_DATA or _offline_hub(ref):
                load_splits(ref, config.data.test_fraction, config.seed)
        else:
            from fedpt_app.classify.data import load_classification_splits, read_classification_file

            if key == "test-dataset":
                read_classification_file(ref)
            elif ref in LOCAL_SETS or Path(ref).suffix in LOCAL_DATA or Path(ref).is_dir() or _offline_hub(ref):
                load_classification_splits(ref, "", config.data.test_fraction, config.seed)
    except DatasetError as error:
        raise ConfigError(f"{key}={ref!r}: {error}") from None


def _check_modality(foundation_model: str, dataset: str) -> None:
    """A vision FM reads image datasets, a text FM text ones (a hub model is checked offline only: its config would
    be downloaded; the ServerApp checks it before building anything)."""
    from fedpt_app.classify.images import is_image_source
    from fedpt_app.classify.inputs import TextInputs, check_inputs_match, model_inputs
    from fedpt_app.models.loading import BUILTIN_MODELS, PACKAGED_GGUF

    inputs = None
    if foundation_model in BUILTIN_MODELS or foundation_model in PACKAGED_GGUF or foundation_model.endswith(".gguf"):
        inputs = TextInputs(foundation_model)  # a language model: known without building or dequantizing it
    elif "/" in foundation_model and not Path(foundation_model).expanduser().exists() and not _offline_hub("hub"):
        return
    try:
        check_inputs_match(
            inputs or model_inputs(foundation_model), "image" if is_image_source(dataset) else "text", dataset
        )
    except (DatasetError, ModelLoadError) as error:
        raise ConfigError(str(error)) from None


def _offline_hub(ref: str) -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" and not ref.startswith(("/", ".", "~"))


def _check_pair(small: str, large: str) -> None:
    """The pair's tokenizers, compared when both are on this machine already (no preset is built for it)."""
    from fedpt_app.models.loading import BUILTIN_MODELS

    if (small in BUILTIN_MODELS and large in BUILTIN_MODELS) or is_remote_ref(large):
        return  # the embedded pair shares its tokenizer by construction; a service is checked on connecting
    local = all(Path(os.path.expanduser(ref)).is_dir() for ref in (small, large))
    if not local:
        return
    from fedpt_app.instruct.proxy import VocabularyMismatchError, shared_vocab_size

    try:
        shared_vocab_size(small, large)
    except VocabularyMismatchError as error:
        raise ConfigError(f"small-model={small!r}, large-model={large!r}: {error}") from None
