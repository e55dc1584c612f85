"""What the classify family's strategies share: a foundation model (FM) loaded as a sequence classifier, the base
model clients train on (`client_base`: the full FM, a sub-FM or an emulator), LoRA on attention plus the head, and
evaluation with the adapter plugged into the full FM.

Whatever the base is, it reaches each client once, with the first round the client is sampled in, and its bytes
are counted in that round's `bytes_down` (and `bytes_down_model`); the adapter state is the same on every base,
so it is plugged into the full FM for `accuracy_full` (and evaluated on the client's base for `accuracy_sub`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import torch
from flwr.app import ArrayRecord, Message
from peft import PeftModel
from transformers import PreTrainedModel

from fedpt_app.classify.data import load_classification_splits
from fedpt_app.classify.evaluation import accuracy
from fedpt_app.classify.inputs import check_inputs_match, model_inputs
from fedpt_app.classify.models import ModelPackage, load_classifier, lora_classifier
from fedpt_app.datafiles import content_key, seeded_sample
from fedpt_app.federation.strategy import FederatedStrategy, State
from fedpt_app.models.lora import LoraSpec, adapter_state, load_adapter_state
from fedpt_app.protocol import BASE_MODEL_KEY, MISSING_BASE, ClientBase, RoundConfig

HOLDER = "holder:"  # checkpoint keys of the base holders


class ClassifyStrategy(FederatedStrategy):
    score_names = ("accuracy_full", "accuracy_sub")
    loss_names = ("align_loss",)

    # ---- models and data ---------------------------------------------------------------------------------
    def load_task(self) -> None:
        config, data, classify = self.config, self.config.data, self.config.classify
        self.inputs = model_inputs(classify.foundation_model)
        splits = load_classification_splits(data.dataset, data.test_dataset, data.test_fraction, config.seed)
        check_inputs_match(self.inputs, splits.kind, data.dataset)
        self.label_names = splits.label_names
        max_length = config.training.max_length
        test_rows = seeded_sample(splits.test, config.evaluation.eval_samples, config.seed)
        self.test_examples = self.inputs.encode(test_rows, max_length)
        public = splits.public[: classify.public_samples] if classify.public_samples else splits.public
        self.public_examples = self.inputs.encode(public, max_length)
        full = load_classifier(classify.foundation_model, splits.num_labels, config.seed)
        base = self.client_base(full)
        self.package = ModelPackage.of(base)  # before LoRA is injected into it
        spec = self.lora_spec()
        self.full_model = lora_classifier(full, spec, config.seed, layers=self.full_lora_layers())
        self.model = (
            self.full_model
            if base is full
            else lora_classifier(base, spec, config.seed, layers=self.client_lora_layers())
        )
        self._check_plug_in()
        self.base_version = 0  # bumped when the server changes the client base (FedPFT's alignment)
        self.holders: dict[str, int] = {}  # device identity -> version of the client base it confirmed holding

    def client_base(self, full: PreTrainedModel) -> PreTrainedModel:
        """The model clients train on (built from the full FM)."""
        raise NotImplementedError

    def distillation_recipe(self) -> dict:
        """What determines a base distilled on the public inputs (part of its cache key)."""
        config, data, classify = self.config, self.config.data, self.config.classify
        return {
            "data": content_key(data.dataset),
            "test_data": content_key(data.test_dataset),  # a separate test set changes which rows are public
            "test_fraction": data.test_fraction,
            "public": len(self.public_examples),
            "max_length": config.training.max_length,
            "steps": classify.align_steps,
            "lr": classify.align_lr,
            "mu": classify.align_mu,
            "batch": classify.align_batch_size,
            "seed": config.seed,
        }

    def public_batches(self, server_round: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless shuffled batches of the public (unlabeled) inputs, seeded by the round."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + server_round)
        return itertools.chain.from_iterable(
            self.inputs.batches(self.public_examples, self.config.classify.align_batch_size, generator=generator)
            for _ in itertools.count()
        )

    def lora_spec(self) -> LoraSpec:
        """The LoRA of this algorithm's adapter: the run's `lora-*` settings unless the algorithm rescales them."""
        return LoraSpec.from_settings(self.config.lora)

    def full_lora_layers(self) -> list[int] | None:
        return None  # LoRA in every block

    def client_lora_layers(self) -> list[int] | None:
        return None

    def plugged(self, state: State) -> State:
        """The client adapter state as the full FM's adapter state (same names unless the algorithm renames)."""
        return state

    def _check_plug_in(self) -> None:
        client, full = adapter_state(self.model), adapter_state(self.full_model)
        plugged = self.plugged(client)
        shapes = {key: tuple(tensor.shape) for key, tensor in plugged.items()}
        if shapes != {key: tuple(tensor.shape) for key, tensor in full.items()}:
            raise ValueError(
                f"{self.config.algorithm}: the client adapter does not plug into the full FM "
                f"({sorted(set(shapes) ^ set(full))[:3]})"
            )

    # ---- what each client receives -----------------------------------------------------------------------
    def open_round(self, number: int, arrays: ArrayRecord) -> tuple[RoundConfig, ArrayRecord]:
        opened = super().open_round(number, arrays)
        self.round.bytes_down_model = 0
        return opened

    def round_config(self, number: int) -> RoundConfig:
        layers, spec = self.client_lora_layers(), self.lora_spec()
        rescaled = spec != LoraSpec.from_settings(self.config.lora)
        base = ClientBase(
            self.package.digest,
            self.base_version,
            lora_layers=tuple(layers) if layers is not None else None,
            lora_r=spec.r if rescaled else None,
            lora_alpha=spec.alpha if rescaled else None,
        )
        return dataclasses.replace(super().round_config(number), base=base, label_names=tuple(self.label_names))

    def deliveries(self, node_id: int, round_config: RoundConfig) -> tuple[RoundConfig, dict[str, ArrayRecord]]:
        """The base model if the node has none (its config travels in the round config), and the base's changes
        if its copy is older than the current version."""
        held = self.holders.get(self.schedule.identities[node_id])
        records = {BASE_MODEL_KEY: self.package.to_array_record()} if held is None else {}
        if held != self.base_version:
            records.update(self.base_updates())
        self.round.bytes_down_model += sum(record.count_bytes() for record in records.values())
        if BASE_MODEL_KEY in records:
            round_config = dataclasses.replace(
                round_config, base=dataclasses.replace(round_config.base, config_json=self.package.config_json)
            )
        return round_config, records

    def base_updates(self) -> dict[str, ArrayRecord]:
        """Records that bring a client's base to `base_version`; none unless the algorithm changes the base."""
        return {}

    def accept_replies(self, usable: list[Message], errors: list[Message]) -> None:
        identities = self.schedule.identities
        for msg in usable:  # a usable reply was trained on the base we sent: the client holds it now
            self.holders[identities[msg.metadata.src_node_id]] = self.base_version
        for msg in errors:  # a device that lost its base (a wiped cache, a new disk) gets it again next time
            if MISSING_BASE in (msg.error.reason or ""):
                self.holders.pop(identities.get(msg.metadata.src_node_id, ""), None)

    def server_state(self) -> dict[str, torch.Tensor]:
        """Which devices hold which version of the base, by identity: a resumed run does not resend it to them."""
        return {f"{HOLDER}{identity}": torch.tensor(version) for identity, version in self.holders.items()}

    def restore_server_state(self, state: dict[str, torch.Tensor]) -> None:
        self.holders = {key[len(HOLDER) :]: int(value) for key, value in state.items() if key.startswith(HOLDER)}

    # ---- evaluation and results --------------------------------------------------------------------------
    def _accuracy(self, model: PeftModel) -> float:
        return accuracy(model, self.inputs.batches(self.test_examples, self.config.evaluation.eval_batch_size))

    def evaluate_models(self, server_round: int, state: State) -> dict[str, float]:
        """accuracy_full: the adapter and head plugged into the full FM; accuracy_sub: on the clients' base."""
        load_adapter_state(self.full_model, self.plugged(state))
        scores = {"accuracy_full": self._accuracy(self.full_model)}
        if self.model is not self.full_model:
            load_adapter_state(self.model, state)
            scores["accuracy_sub"] = self._accuracy(self.model)
        return scores

    def model_to_save(self, state: State) -> PeftModel:
        """The plug-in result: the adapter and head on the full FM."""
        load_adapter_state(self.full_model, self.plugged(state))
        return self.full_model

    def summary_fields(self) -> dict[str, str]:
        foundation_model = self.config.classify.foundation_model
        return {
            "adapter_base_model": foundation_model,
            "foundation_model": foundation_model,
            "label_names": list(self.label_names),
        }
