"""FedAvg over the LoRA adapter of the small model: the baseline every other algorithm extends.

Subclasses add their own server step after aggregation (`server_step`) and their own evaluations
(`evaluate_models`). What every algorithm shares lives here: the round's config and learning-rate decay, reply
screening (`fedpt_app.validation`) and failure counting, the (optionally differentially private) average, the
bookkeeping (bytes, timings, metrics.jsonl) and the per-round checkpoint that a rerun resumes from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from peft import PeftModel

from fedpt_app.aggregation import fedavg
from fedpt_app.checkpoint import Checkpoint, resumable_checkpoint, save_checkpoint
from fedpt_app.config import RunConfig
from fedpt_app.data.sources import load_test_rows
from fedpt_app.decoding import StepFn, model_step
from fedpt_app.evaluation import evaluate_generation
from fedpt_app.messages import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from fedpt_app.models.loading import LOAD_COUNTS, load_tokenizer
from fedpt_app.models.lora import (LoraSpec, adapter_state, from_array_record, load_adapter_state, lora_model,
                                   to_array_record)
from fedpt_app.privacy import clipped, noisy_mean
from fedpt_app.reporting import MetricsLog
from fedpt_app.validation import UpdateRules, check_reply


def content_digest(msg: Message) -> str:
    """A digest of a reply's adapter tensors: a deterministic sort key whatever order replies arrive in."""
    digest = hashlib.sha256()
    for key, array in sorted(msg.content[ARRAYS_KEY].items()):
        digest.update(key.encode())
        digest.update(array.data)
    return digest.hexdigest()


class RoundFailedError(RuntimeError):
    """Fewer clients than `min-train-nodes` replied usefully: the run stops rather than use a bad model."""


class FedAvgLora(FedAvg):
    algorithm = "fedavg"
    trained_role = "small"  # which of the pair the clients LoRA-tune: "small" or "large"
    score_names = ("rouge_l_small", "rouge_l_proxy", "rouge_l_large")  # every metrics.jsonl row has these keys

    def __init__(self, config: RunConfig) -> None:
        super().__init__(fraction_train=config.fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=config.min_train_nodes, min_available_nodes=config.min_train_nodes,
                         arrayrecord_key=ARRAYS_KEY, configrecord_key=CONFIG_KEY)
        self.config = config
        self.load_task()
        run_config = dataclasses.asdict(config)
        self.checkpoint = resumable_checkpoint(config.output_path(), run_config)
        self.resumed_round = self.checkpoint.completed_round if self.checkpoint else 0
        self.metrics = MetricsLog(config.output_path(), run_config, keep_rounds_upto=self.resumed_round)
        self._round: dict = {}
        self._broadcast: dict[str, torch.Tensor] = {}

    def load_task(self) -> None:
        """The trained model (`self.model`, a peft model whose adapter travels) and the evaluation data."""
        config = self.config
        self.model_ref = config.large_model if self.trained_role == "large" else config.small_model
        self.tokenizer = load_tokenizer(self.model_ref)
        self.model = lora_model(self.model_ref, LoraSpec.from_run_config(config), self.quantization, config.seed)
        self.test_rows = load_test_rows(config.dataset, config.test_dataset, config.test_fraction,
                                        config.seed)[:config.eval_samples]

    @property
    def quantization(self) -> str:
        return self.config.large_model_quantization if self.trained_role == "large" else "none"

    # ---- what the round sends and receives ---------------------------------------------------------------
    def initial_arrays(self) -> ArrayRecord:
        """The fresh adapter, or the checkpointed one when this run resumes an interrupted one."""
        if self.checkpoint is not None:
            log(INFO, "[fedpt-app] resuming from the checkpoint of round %d in %s", self.resumed_round,
                self.metrics.output_dir)
            self.checkpoint.restore_rng()
            self.restore_server_state(self.checkpoint.server_state)
            return to_array_record(self.checkpoint.adapter, "float32")
        return to_array_record(adapter_state(self.model), "float32")

    def server_state(self) -> dict[str, torch.Tensor]:
        """State besides the adapter that the next round depends on (checkpointed with it); FedAvg has none."""
        return {}

    def restore_server_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back `server_state()` from the checkpoint of an interrupted run."""

    @property
    def rounds_left(self) -> int:
        return self.config.num_server_rounds - self.resumed_round

    # Flower numbers the rounds of `start()` from 1; a resumed run's round r is Flower's r - resumed_round.
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.resumed_round
        entries, wire_arrays = self.begin_round(server_round, arrays)
        for key, value in entries.items():
            config[key] = value
        messages = list(super().configure_train(server_round, wire_arrays, config, grid))
        self.count_sent(len(messages), wire_arrays)
        return messages

    def begin_round(self, server_round: int, arrays: ArrayRecord) -> tuple[dict, ArrayRecord]:
        """(the round's config entries for the clients, the adapter as it goes on the wire)."""
        lr = self.config.round_lr(server_round)
        self._round = {"started": time.perf_counter(), "lr": lr}
        entries = {"lr": lr, "model": self.trained_role}
        if self.config.dp_mode == "client":  # read by the ClientApp's clipping mod
            entries[KEY_CLIPPING_NORM] = self.config.dp_clipping_norm
        wire_arrays = to_array_record(from_array_record(arrays), self.config.wire_dtype)
        self._broadcast = from_array_record(wire_arrays)  # what clients start from, as they decode it
        return entries, wire_arrays

    def count_sent(self, clients: int, wire_arrays: ArrayRecord) -> None:
        self._round["sent"] = clients
        self._round["bytes_down"] = wire_arrays.count_bytes() * clients

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.resumed_round
        replies = list(replies)
        usable, problems, norms = self.screen_replies(replies)
        timeouts = self.check_enough_replies(server_round, len(replies), len(usable), problems)
        metrics = [msg.content[METRICS_KEY] for msg in usable]
        weights = [float(record["num-examples"]) for record in metrics]
        global_state = self.aggregate([from_array_record(msg.content[ARRAYS_KEY]) for msg in usable], weights)
        self._round.update({
            "failures": sum(msg.has_error() for msg in replies) + timeouts,
            "rejected": sum(not msg.has_error() for msg in replies) - len(usable), "problems": problems,
            "update_norm_max": max(norms),
            "bytes_up": sum(msg.content[ARRAYS_KEY].count_bytes() for msg in usable),
        })
        return self.complete_round(server_round, global_state, metrics)

    def check_enough_replies(self, server_round: int, replies: int, usable: int, problems: list[str]) -> int:
        """The number of sampled clients that never replied; stops the run below `min-train-nodes`."""
        timeouts = self._round["sent"] - replies
        if timeouts:
            log(WARNING, "[fedpt-app] round %d: %d sampled client(s) did not reply within round-timeout=%gs",
                server_round, timeouts, self.config.round_timeout)
        if usable < self.min_train_nodes:
            raise RoundFailedError(
                f"Round {server_round}: only {usable} usable replies from {self._round['sent']} sampled "
                f"clients (min-train-nodes={self.min_train_nodes}); {timeouts} timed out; "
                f"{'; '.join(problems) or 'no other problems'}. The global adapter of round {server_round - 1} is "
                f"kept in the checkpoint: rerun with the same output-dir to resume.")
        return timeouts

    def complete_round(self, server_round: int, global_state: OrderedDict[str, torch.Tensor],
                       metrics: list) -> tuple[ArrayRecord, MetricRecord]:
        """The server step on the aggregate, and the round's training bookkeeping."""
        weights = [float(record["num-examples"]) for record in metrics]
        server_started = time.perf_counter()
        global_state = self.server_step(server_round, global_state)
        train_loss = sum(float(r["train-loss"]) * w for r, w in zip(metrics, weights)) / sum(weights)
        self._round.update({
            "clients": len(metrics), "num_examples": int(sum(weights)), "train_loss": train_loss,
            "client_train_seconds": max(float(r["train-seconds"]) for r in metrics),
            "client_model_loads": max(int(r["model-loads"]) for r in metrics),
            "client_peak_rss_mb": max(float(r["peak-rss-mb"]) for r in metrics),
            "client_cuda_peak_mb": max(float(r["cuda-peak-mb"]) for r in metrics),
            "server_step_seconds": time.perf_counter() - server_started,
        })
        return to_array_record(global_state, "float32"), MetricRecord({"train-loss": train_loss})

    def aggregate(self, states: list[dict[str, torch.Tensor]], weights: list[float]) -> OrderedDict[str, torch.Tensor]:
        """FedAvg weighted by num-examples; with differential privacy, the clipped, noised uniform mean."""
        config = self.config
        if config.dp_mode == "off":
            return fedavg(states, weights)
        if config.dp_mode == "server":
            states = [clipped(state, self._broadcast, config.dp_clipping_norm) for state in states]
        state, stdv = noisy_mean(states, config.dp_clipping_norm, config.dp_noise_multiplier)
        self._round["dp_noise_stdv"] = stdv
        return state

    def screen_replies(self, replies: list[Message]) -> tuple[list[Message], list[str], list[float]]:
        """(usable replies in a content-defined order, 'node N: reason' for each dropped one, the usable replies'
        update norms).

        The order makes the float sums of FedAvg independent of the order in which replies arrived, so a resumed
        run aggregates bit for bit like an uninterrupted one.
        """
        max_norm = self.config.max_update_norm or math.inf
        if self.config.dp_mode == "client":  # devices promised to clip: hold them to it (float16 rounding aside)
            max_norm = min(max_norm, self.config.dp_clipping_norm * 1.001)
        rules = self.update_rules(max_norm if max_norm < math.inf else 0.0)
        usable, problems, norms = [], [], []
        for msg in replies:
            verdict = check_reply(msg, rules)
            if verdict.problem is None:
                usable.append(msg)
                norms.append(verdict.update_norm)
            else:
                problems.append(f"node {msg.metadata.src_node_id}: {verdict.problem}")
                log(WARNING, "[fedpt-app] dropped the reply of node %d: %s", msg.metadata.src_node_id,
                    verdict.problem)
        return sorted(usable, key=content_digest), problems, norms

    def update_rules(self, max_norm: float) -> UpdateRules:
        """What a usable reply looks like this round (0: no norm bound)."""
        return UpdateRules(self._broadcast, self.config.wire_dtype, max_norm, self.config.max_num_examples)

    def server_step(self, server_round: int, state: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """The algorithm's own work after aggregation; FedAvg has none."""
        return state

    # ---- evaluation and bookkeeping ---------------------------------------------------------------------
    def evaluation_due(self, server_round: int) -> bool:
        interval = self.config.eval_interval
        return interval > 0 and (server_round % interval == 0 or server_round == self.config.num_server_rounds)

    def evaluate_models(self, server_round: int, state: OrderedDict[str, torch.Tensor]) -> dict[str, float]:
        """Rouge-L / exact match of each model this algorithm reports (FedAvg: the tuned model itself)."""
        load_adapter_state(self.model, state)
        return self.evaluate_step(self.trained_role, lambda: model_step(self.model))

    def evaluate_step(self, name: str, new_step: Callable[[], StepFn]) -> dict[str, float]:
        """Greedy answers on the test rows from one decoding setup, reported as `rouge_l_<name>`."""
        scores = evaluate_generation(new_step, self.tokenizer, self.test_rows,
                                     max_new_tokens=self.config.max_new_tokens,
                                     batch_size=self.config.eval_batch_size)
        self.metrics.write_predictions(name, self.test_rows, scores.predictions)
        return {f"rouge_l_{name}": scores.rouge_l, f"exact_match_{name}": scores.exact_match}

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's `evaluate_fn`: runs after every round (and at round 0); writes the round's metrics row and
        the checkpoint."""
        if server_round == 0 and self.resumed_round:
            return None  # evaluated and recorded before the interruption
        server_round += self.resumed_round
        eval_started = time.perf_counter()
        if server_round == 0:
            self._round = {"started": eval_started}
        state = from_array_record(arrays)
        scores = self.evaluate_models(server_round, state) if self.evaluation_due(server_round) else {}
        finished = time.perf_counter()
        row = {"round": server_round, "algorithm": self.algorithm, "train_loss": None, "bytes_up": 0,
               "bytes_down": 0, **{k: v for k, v in self._round.items() if k not in ("started", "sent")},
               **dict.fromkeys(self.score_names), **scores, "eval_seconds": finished - eval_started,
               "round_seconds": finished - self._round["started"], "server_model_loads": sum(LOAD_COUNTS.values())}
        self.metrics.append(row, self.config.num_server_rounds)
        if server_round > 0:
            save_checkpoint(self.metrics.output_dir, Checkpoint.capture(server_round, state, self.metrics.run_config,
                                                                        server_state=self.server_state()))
        return MetricRecord({k: v for k, v in scores.items()}) if scores else None

    def model_to_save(self, state: OrderedDict[str, torch.Tensor]) -> PeftModel:
        """The peft model whose adapter `finish` saves, carrying the final state."""
        load_adapter_state(self.model, state)
        return self.model

    def finish(self, final_arrays: ArrayRecord) -> dict:
        """Save the final adapter (loadable with `PeftModel.from_pretrained`) and summary.json."""
        final_state = from_array_record(final_arrays)
        saved_model = self.model_to_save(final_state)
        save_checkpoint(self.metrics.output_dir, Checkpoint.capture(self.config.num_server_rounds, final_state,
                                                                    self.metrics.run_config, finished=True))
        adapter_dir = self.metrics.output_dir / "adapter"
        saved_model.save_pretrained(adapter_dir)
        summary = self.metrics.write_summary({"algorithm": self.algorithm, "adapter_dir": str(adapter_dir),
                                              "adapter_base_model": self.model_ref,
                                              "small_model": self.config.small_model,
                                              "large_model": self.config.large_model})
        log(INFO, "[fedpt-app] metrics: %s", self.metrics.path)
        log(INFO, "[fedpt-app] adapter: %s", adapter_dir)
        if summary["final"] is None:
            log(WARNING, "[fedpt-app] no evaluation ran (eval-interval=0)")
        return summary
