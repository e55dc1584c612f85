"""FedAvg over the LoRA adapter of the small model: the baseline every other algorithm extends.

Subclasses add their own server step after aggregation (`server_step`) and their own evaluations
(`evaluate_models`); the round bookkeeping (learning-rate decay, bytes, timings, metrics.jsonl) lives here.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpt_app.aggregation import fedavg
from fedpt_app.config import RunConfig
from fedpt_app.data.sources import load_test_rows
from fedpt_app.decoding import StepFn, model_step
from fedpt_app.evaluation import evaluate_generation
from fedpt_app.messages import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from fedpt_app.models.loading import LOAD_COUNTS, load_tokenizer
from fedpt_app.models.lora import (LoraSpec, adapter_state, from_array_record, load_adapter_state, lora_model,
                                   to_array_record)
from fedpt_app.reporting import MetricsLog


class RoundFailedError(RuntimeError):
    """Fewer clients than `min-train-nodes` replied usefully: the run stops rather than use a bad model."""


class FedAvgLora(FedAvg):
    algorithm = "fedavg"
    trained_role = "small"  # which of the pair the clients LoRA-tune: "small" or "large"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(fraction_train=config.fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=config.min_train_nodes, min_available_nodes=config.min_train_nodes,
                         arrayrecord_key=ARRAYS_KEY, configrecord_key=CONFIG_KEY)
        self.config = config
        self.model_ref = config.large_model if self.trained_role == "large" else config.small_model
        self.tokenizer = load_tokenizer(self.model_ref)
        self.model = lora_model(self.model_ref, LoraSpec.from_run_config(config), self.quantization, config.seed)
        self.test_rows = load_test_rows(config.dataset, config.test_dataset, config.test_fraction,
                                        config.seed)[:config.eval_samples]
        self.metrics = MetricsLog(config.output_path(), dataclasses.asdict(config))
        self._round: dict = {}

    @property
    def quantization(self) -> str:
        return self.config.large_model_quantization if self.trained_role == "large" else "none"

    # ---- what the round sends and receives ---------------------------------------------------------------
    def initial_arrays(self) -> ArrayRecord:
        return to_array_record(adapter_state(self.model), "float32")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        lr = self.config.round_lr(server_round)
        self._round = {"started": time.perf_counter(), "lr": lr}
        config["lr"] = lr
        config["model"] = self.trained_role
        wire_arrays = to_array_record(from_array_record(arrays), self.config.wire_dtype)
        messages = list(super().configure_train(server_round, wire_arrays, config, grid))
        self._round["bytes_down"] = wire_arrays.count_bytes() * len(messages)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, failed = self._check_and_log_replies(list(replies), is_train=True)
        if len(valid) < self.min_train_nodes:
            reasons = "; ".join(f"node {msg.metadata.src_node_id}: {msg.error.reason}" for msg in failed)
            raise RoundFailedError(f"Round {server_round}: only {len(valid)} of {len(valid) + len(failed)} clients "
                                   f"replied (min-train-nodes={self.min_train_nodes}). {reasons}")
        metrics = [msg.content[METRICS_KEY] for msg in valid]
        weights = [float(record["num-examples"]) for record in metrics]
        global_state = fedavg([from_array_record(msg.content[ARRAYS_KEY]) for msg in valid], weights)
        server_started = time.perf_counter()
        global_state = self.server_step(server_round, global_state)
        train_loss = sum(float(r["train-loss"]) * w for r, w in zip(metrics, weights)) / sum(weights)
        self._round.update({
            "clients": len(valid), "failures": len(failed), "num_examples": int(sum(weights)),
            "train_loss": train_loss,
            "bytes_up": sum(msg.content[ARRAYS_KEY].count_bytes() for msg in valid),
            "client_train_seconds": max(float(r["train-seconds"]) for r in metrics),
            "client_model_loads": max(int(r["model-loads"]) for r in metrics),
            "client_peak_rss_mb": max(float(r["peak-rss-mb"]) for r in metrics),
            "client_cuda_peak_mb": max(float(r["cuda-peak-mb"]) for r in metrics),
            "server_step_seconds": time.perf_counter() - server_started,
        })
        return to_array_record(global_state, "float32"), MetricRecord({"train-loss": train_loss})

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
        """Flower's `evaluate_fn`: runs after every round (and at round 0); writes the round's metrics row."""
        eval_started = time.perf_counter()
        if server_round == 0:
            self._round = {"started": eval_started}
        scores = self.evaluate_models(server_round, from_array_record(arrays)) if self.evaluation_due(server_round) else {}
        finished = time.perf_counter()
        row = {"round": server_round, "algorithm": self.algorithm, "train_loss": None, "bytes_up": 0,
               "bytes_down": 0, **{k: v for k, v in self._round.items() if k != "started"},
               "rouge_l_small": None, "rouge_l_proxy": None, "rouge_l_large": None, **scores, "eval_seconds": finished - eval_started,
               "round_seconds": finished - self._round["started"], "server_model_loads": sum(LOAD_COUNTS.values())}
        self.metrics.append(row, self.config.num_server_rounds)
        return MetricRecord({k: v for k, v in scores.items()}) if scores else None

    def finish(self, final_arrays: ArrayRecord) -> dict:
        """Save the final adapter (loadable with `PeftModel.from_pretrained`) and summary.json."""
        load_adapter_state(self.model, from_array_record(final_arrays))
        adapter_dir = self.metrics.output_dir / "adapter"
        self.model.save_pretrained(adapter_dir)
        summary = self.metrics.write_summary({"algorithm": self.algorithm, "adapter_dir": str(adapter_dir),
                                              "adapter_base_model": self.model_ref,
                                              "small_model": self.config.small_model,
                                              "large_model": self.config.large_model})
        log(INFO, "[fedpt-app] metrics: %s", self.metrics.path)
        log(INFO, "[fedpt-app] adapter: %s", adapter_dir)
        if summary["final"] is None:
            log(WARNING, "[fedpt-app] no evaluation ran (eval-interval=0)")
        return summary
