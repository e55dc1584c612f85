"""ClientApp task for FedPFT, FedPETuning and FedOT: train LoRA and the head on the base model the server sent.

The base (full FM, sub-FM or emulator) arrives once, with the first round this device is sampled in, and is kept
in the process and in the device's model cache (a deployed ClientApp runs each round in a fresh process); FedPFT's
aligned FFN weights arrive the same way when they change.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from peft import PeftModel

from fedpt_app.client import cuda_peak_mb, local_data, peak_rss_mb, use_node_model_cache
from fedpt_app.compression.apoz import count_zero_activations
from fedpt_app.compression.ffn import find_ffns
from fedpt_app.config import RunConfig
from fedpt_app.data.classification import batches, encode_rows, read_classification_file
from fedpt_app.messages import APOZ_KEY, ARRAYS_KEY, BASE_MODEL_KEY, CONFIG_KEY, FFN_UPDATE_KEY, METRICS_KEY
from fedpt_app.models.classifier import ModelPackage, lora_classifier
from fedpt_app.models.loading import LOAD_COUNTS, cache_root, load_tokenizer
from fedpt_app.models.lora import LoraSpec, adapter_state, from_array_record, load_adapter_state, to_array_record
from fedpt_app.training import train_lora


class MissingBaseError(RuntimeError):
    """The server assumed this device holds a base model it does not have."""


@functools.cache
def _local_examples(source, partition_id: int, model_ref: str, max_length: int) -> tuple[dict, ...]:
    """This node's encoded training rows (its partition, or its own data file), prepared once per process."""
    if isinstance(source, str):
        rows, _ = read_classification_file(source)
    else:
        from fedpt_app.data.partition import load_partition

        rows = load_partition(source, partition_id)
    return tuple(encode_rows(load_tokenizer(model_ref), rows, max_length))


# This process's current base: (base id, version, peft model). One at a time: a device trains one run's base.
_BASE: dict[str, tuple[str, int, PeftModel]] = {}


def _stored(base_id: str) -> Path:
    return cache_root() / "client-bases" / f"{base_id}.pt"


def _receive_base(msg: Message, config: RunConfig) -> PeftModel:
    """The peft model on this round's base: as received now, kept from an earlier round, or from the device's
    model cache; FFN updates applied. Raises MissingBaseError if the device has no copy of it."""
    round_config = msg.content[CONFIG_KEY]
    base_id, version = str(round_config["base-id"]), int(round_config["base-version"])
    current = _BASE.get("current")
    if BASE_MODEL_KEY in msg.content:
        package = ModelPackage.from_record(str(round_config["base-config"]), msg.content[BASE_MODEL_KEY])
        _store(base_id, {"config_json": package.config_json, "state": dict(package.state), "ffn": {}, "version": 0})
        current = None
    if current is None or current[0] != base_id or (current[1] != version and FFN_UPDATE_KEY not in msg.content):
        current = _load_stored(base_id, config, round_config)  # e.g. another node of this process got an update
    model = current[2]
    if FFN_UPDATE_KEY in msg.content:
        ffn = dict(from_array_record(msg.content[FFN_UPDATE_KEY]))
        _apply_ffn(model, ffn)
        saved = torch.load(_stored(base_id), weights_only=True)
        _store(base_id, {**saved, "ffn": ffn, "version": version})
        current = (base_id, version, model)
    if current[1] != version:
        raise MissingBaseError(f"This device holds version {current[1]} of base {base_id}; the server trains on "
                               f"version {version} and sent no update")
    _BASE["current"] = current
    return model


def _store(base_id: str, content: dict) -> None:
    path = _stored(base_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")  # simulated nodes on one machine share the cache
    torch.save(content, temporary)
    temporary.replace(path)


def _load_stored(base_id: str, config: RunConfig, round_config) -> tuple[str, int, PeftModel]:
    path = _stored(base_id)
    if not path.exists():
        raise MissingBaseError(f"This device has no copy of base model {base_id} (looked in {path}); the server "
                               "sends it to devices that have not yet returned a usable reply with it")
    saved = torch.load(path, weights_only=True)
    base = ModelPackage(saved["config_json"], saved["state"]).build()
    LOAD_COUNTS[base_id] += 1
    layers = round_config.get("lora-layers")
    model = lora_classifier(base, LoraSpec.from_run_config(config), config.seed,
                            layers=[int(layer) for layer in layers] if layers else None)
    if saved["ffn"]:
        _apply_ffn(model, saved["ffn"])
    return base_id, int(saved["version"]), model


def _apply_ffn(model: PeftModel, ffn: dict[str, torch.Tensor]) -> None:
    base = model.get_base_model()
    unexpected = set(ffn) - set(dict(base.named_parameters()))
    if unexpected:
        raise ValueError(f"FFN update names tensors this base does not have: {sorted(unexpected)[:3]}")
    base.load_state_dict(ffn, strict=False)


def _count_apoz(model: PeftModel, examples, config: RunConfig, pad_token_id: int) -> ArrayRecord:
    """Zero-activation counts of the compressed layers' neurons on local data (before this round's training)."""
    layers = config.compressed_layer_indices(len(find_ffns(model)))
    counts, tokens = count_zero_activations(model, layers, batches(examples, config.batch_size, pad_token_id))
    return ArrayRecord({**{f"layer-{layer}": Array(counts[layer].numpy()) for layer in layers},
                        "tokens": Array(np.array([tokens], dtype=np.float64))})


def train(msg: Message, context: Context) -> Message:
    """Apply the global adapter and head to the base, (count APoZ,) train, reply with adapter and metrics."""
    config = RunConfig.from_mapping(context.run_config)
    use_node_model_cache(context)
    source, partition_id = local_data(context, config)
    round_config = msg.content[CONFIG_KEY]
    tokenizer = load_tokenizer(config.foundation_model)
    examples = _local_examples(source, partition_id, config.foundation_model, config.max_length)
    model = _receive_base(msg, config)
    load_adapter_state(model, from_array_record(msg.content[ARRAYS_KEY]))
    records = {}
    if bool(round_config.get("count-apoz", False)):
        records[APOZ_KEY] = _count_apoz(model, examples, config, tokenizer.pad_token_id)
    server_round = int(round_config["server-round"])
    result = train_lora(model, examples, epochs=config.local_epochs, lr=float(round_config["lr"]),
                        batch_size=config.batch_size, pad_token_id=tokenizer.pad_token_id,
                        seed=config.seed * 100_003 + server_round * 1_009 + partition_id,
                        description=f"client {partition_id} round {server_round}", make_batches=batches)
    metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss,
                            "train-seconds": result.seconds, "model-loads": sum(LOAD_COUNTS.values()),
                            "peak-rss-mb": peak_rss_mb(), "cuda-peak-mb": cuda_peak_mb()})
    reply = RecordDict({ARRAYS_KEY: to_array_record(adapter_state(model), config.wire_dtype), METRICS_KEY: metrics,
                        **records})
    return Message(content=reply, reply_to=msg)
