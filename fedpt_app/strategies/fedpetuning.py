"""FedPETuning: clients LoRA-tune the full foundation model (attention plus the classification head), FedAvg.

It is also the base of FedPFT and FedOT, which differ only in the base model clients train on (`client_base`) and
in their server steps. Whatever that base is, it reaches each client once, with the first round the client is
sampled in, and its bytes are counted in that round's `bytes_down`; the adapter state is the same on every base,
so it is plugged into the full FM for `accuracy_full` (and evaluated on the client's base for `accuracy_sub`).
"""

from __future__ import annotations

from collections import OrderedDict
import itertools
from collections.abc import Iterable, Iterator

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from peft import PeftModel
from transformers import PreTrainedModel

from fedpt_app.data.classification import batches, encode_rows, load_classification_splits
from fedpt_app.evaluation import accuracy
from fedpt_app.messages import ARRAYS_KEY, BASE_MODEL_KEY, CONFIG_KEY
from fedpt_app.models.classifier import ModelPackage, load_classifier, lora_classifier
from fedpt_app.models.loading import load_tokenizer
from fedpt_app.models.lora import LoraSpec, adapter_state, load_adapter_state
from fedpt_app.strategies.fedavg import FedAvgLora


class FedPETuning(FedAvgLora):
    algorithm = "fedpetuning"
    score_names = ("accuracy_full", "accuracy_sub")

    # ---- models and data ---------------------------------------------------------------------------------
    def load_task(self) -> None:
        config = self.config
        self.model_ref = config.foundation_model
        self.tokenizer = load_tokenizer(config.foundation_model)
        splits = load_classification_splits(config.dataset, config.test_dataset, config.test_fraction, config.seed)
        self.label_names = splits.label_names
        self.test_examples = encode_rows(self.tokenizer, splits.test[:config.eval_samples], config.max_length)
        public = splits.public[:config.public_samples] if config.public_samples else splits.public
        self.public_examples = encode_rows(self.tokenizer, public, config.max_length)
        full = load_classifier(config.foundation_model, splits.num_labels, config.seed)
        base = self.client_base(full)
        self.package = ModelPackage.of(base)  # before LoRA is injected into it
        spec = LoraSpec.from_run_config(config)
        self.full_model = lora_classifier(full, spec, config.seed, layers=self.full_lora_layers())
        self.model = self.full_model if base is full else lora_classifier(base, spec, config.seed,
                                                                           layers=self.client_lora_layers())
        self._check_plug_in()
        self.holders: dict[int, int] = {}  # node id -> version of the client base it confirmed holding

    def client_base(self, full: PreTrainedModel) -> PreTrainedModel:
        """The model clients train on; FedPETuning: the full FM itself."""
        return full

    def distillation_recipe(self) -> dict:
        """What determines a base distilled on the public texts (part of its cache key)."""
        config = self.config
        return {"data": config.dataset, "test_fraction": config.test_fraction, "public": len(self.public_examples),
                "max_length": config.max_length, "steps": config.align_steps, "lr": config.align_lr,
                "mu": config.align_mu, "batch": config.align_batch_size, "seed": config.seed}

    def public_batches(self, server_round: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless shuffled batches of the public (unlabeled) texts, seeded by the round."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + server_round)
        return itertools.chain.from_iterable(
            batches(self.public_examples, self.config.align_batch_size, self.tokenizer.pad_token_id, generator)
            for _ in itertools.count())

    def full_lora_layers(self) -> list[int] | None:
        return None  # LoRA in every block

    def client_lora_layers(self) -> list[int] | None:
        return None

    def plugged(self, state: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """The client adapter state as the full FM's adapter state (same names unless a subclass renames)."""
        return state

    def _check_plug_in(self) -> None:
        client, full = adapter_state(self.model), adapter_state(self.full_model)
        plugged = self.plugged(client)
        shapes = {key: tuple(tensor.shape) for key, tensor in plugged.items()}
        if shapes != {key: tuple(tensor.shape) for key, tensor in full.items()}:
            raise ValueError(f"{self.algorithm}: the client adapter does not plug into the full FM "
                             f"({sorted(set(shapes) ^ set(full))[:3]})")

    # ---- what each client receives -----------------------------------------------------------------------
    base_version = 0  # bumped when the server changes the client base (FedPFT's alignment)

    def round_entries(self, server_round: int) -> dict:
        entries = {"base-id": self.package.digest, "base-version": self.base_version}
        if self.client_lora_layers() is not None:
            entries["lora-layers"] = self.client_lora_layers()
        return entries

    def deliveries(self, node_id: int) -> dict[str, ArrayRecord]:
        """The records a client needs besides the adapter: the base model if it has none, and the base's changes
        if its copy is older than the current version."""
        held = self.holders.get(node_id)
        records = {BASE_MODEL_KEY: self.package.to_array_record()} if held is None else {}
        if held != self.base_version:
            records.update(self.base_updates())
        return records

    def base_updates(self) -> dict[str, ArrayRecord]:
        """Records that bring a client's base to `base_version`; FedPETuning never changes the base."""
        return {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        server_round += self.resumed_round
        entries = self.round_entries(server_round)
        self._round["bytes_down_model"] = 0
        return [self._with_deliveries(msg, entries) for msg in messages]

    def _with_deliveries(self, msg: Message, entries: dict) -> Message:
        node_id = msg.metadata.dst_node_id
        round_config = ConfigRecord({**dict(msg.content[CONFIG_KEY]), **entries})
        extra = self.deliveries(node_id)
        if BASE_MODEL_KEY in extra:
            round_config["base-config"] = self.package.config_json
        sent = sum(record.count_bytes() for record in extra.values())
        self._round["bytes_down"] += sent
        self._round["bytes_down_model"] += sent
        content = RecordDict({ARRAYS_KEY: msg.content[ARRAYS_KEY], CONFIG_KEY: round_config, **extra})
        return Message(content=content, dst_node_id=node_id, message_type=msg.metadata.message_type)

    def screen_replies(self, replies: list[Message]) -> tuple[list[Message], list[str], list[float]]:
        usable, problems, norms = super().screen_replies(replies)
        for msg in usable:  # a usable reply was trained on the base we sent: the client holds it now
            self.holders[msg.metadata.src_node_id] = self.base_version
        return usable, problems, norms

    # ---- evaluation and results --------------------------------------------------------------------------
    def _accuracy(self, model: PeftModel) -> float:
        return accuracy(model, self.test_examples, batch_size=self.config.eval_batch_size,
                        pad_token_id=self.tokenizer.pad_token_id)

    def evaluate_models(self, server_round: int, state: OrderedDict[str, torch.Tensor]) -> dict[str, float]:
        """accuracy_full: the adapter and head plugged into the full FM; accuracy_sub: on the clients' base."""
        load_adapter_state(self.full_model, self.plugged(state))
        scores = {"accuracy_full": self._accuracy(self.full_model)}
        if self.model is not self.full_model:
            load_adapter_state(self.model, state)
            scores["accuracy_sub"] = self._accuracy(self.model)
        return scores

    def model_to_save(self, state: OrderedDict[str, torch.Tensor]) -> PeftModel:
        """The plug-in result: the adapter and head on the full FM."""
        load_adapter_state(self.full_model, self.plugged(state))
        return self.full_model
