"""The round lifecycle every algorithm shares, whatever its task: Flower's FedAvg over a LoRA adapter.

One round: `configure_train` opens the round (its learning rate, the adapter in the wire dtype, the round config)
and builds each sampled node's message once, with whatever that node needs besides the adapter (`deliveries`);
`aggregate_train` screens the replies, stops the run below `min-train-nodes`, averages the usable adapters
(differentially private if asked) and runs the algorithm's `server_step`; `evaluate_round` (Flower's evaluate_fn)
evaluates, writes the round's metrics.jsonl row and the checkpoint a rerun resumes from; `finish` saves the final
adapter and summary.json.

A family strategy implements `load_task` (its models and evaluation data, `self.model` being the peft model whose
adapter travels) and `evaluate_models`. The other hooks have defaults: `round_config`, `deliveries`,
`reply_records`, `accept_replies`, `server_step`, `server_state` / `restore_server_state`, `model_to_save`,
`summary_fields`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from peft import PeftModel

from fedpt_app.config import RunConfig
from fedpt_app.federation.aggregation import fedavg
from fedpt_app.federation.checkpoint import Checkpoint, resumable_checkpoint, save_checkpoint
from fedpt_app.federation.metrics_log import MetricsLog
from fedpt_app.federation.privacy import PrivacyBudget, clipped, noisy_mean
from fedpt_app.federation.round_state import RoundState
from fedpt_app.federation.schedule import ClientSchedule
from fedpt_app.federation.screening import RoundFailedError, UpdateRules, check_reply
from fedpt_app.models.loading import LOAD_COUNTS
from fedpt_app.models.lora import from_array_record, load_adapter_state, to_array_record
from fedpt_app.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, ReplyMetrics, RoundConfig

State = OrderedDict[str, torch.Tensor]


def content_digest(msg: Message) -> str:
    """A digest of a reply's adapter tensors: a deterministic sort key whatever order replies arrive in."""
    digest = hashlib.sha256()
    for key, array in sorted(msg.content[ARRAYS_KEY].items()):
        digest.update(key.encode())
        digest.update(array.data)
    return digest.hexdigest()


class FederatedStrategy(FedAvg):
    score_names: tuple[str, ...] = ()  # every metrics.jsonl row has these keys (None until evaluated)
    loss_names: tuple[str, ...] = ()  # the algorithm's own losses, shown on the console line beside train_loss
    model: PeftModel  # the model whose adapter (and head) travels, set by `load_task`

    def __init__(self, config: RunConfig) -> None:
        federation = config.federation
        super().__init__(
            fraction_train=federation.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=federation.min_train_nodes,
            min_available_nodes=federation.min_train_nodes,
            arrayrecord_key=ARRAYS_KEY,
            configrecord_key=CONFIG_KEY,
        )
        self.config = config
        self.load_task()  # bad models or data fail here, before any output is written
        run_config = config.flat()
        self.checkpoint = resumable_checkpoint(config.output_path(), run_config)
        self.resumed_round = self.checkpoint.completed_round if self.checkpoint else 0
        self.metrics = MetricsLog(
            config.output_path(),
            run_config,
            keep_rounds_upto=self.resumed_round,
            score_names=self.score_names,
            line_fields=("train_loss", *self.loss_names, *self.score_names, "epsilon"),
            report_to=config.evaluation.reporters(),
        )
        self.round = RoundState(self.resumed_round)
        self.schedule = ClientSchedule(
            config.seed, federation.fraction_train, federation.min_train_nodes, federation.round_timeout
        )
        self.latest_arrays: ArrayRecord | None = None  # the global adapter after the last completed round
        self.privacy_budget = self._privacy_budget()

    def _privacy_budget(self) -> PrivacyBudget | None:
        """With differential privacy, the ε ledger (the resumed rounds replayed); refuses a plan over the target."""
        privacy = self.config.privacy
        if privacy.dp_mode == "off" or privacy.dp_noise_multiplier == 0.0:
            return None
        spent = [row["dp_sample_rate"] for row in self.metrics.rows if row.get("dp_sample_rate") is not None]
        budget = PrivacyBudget(privacy, spent)
        budget.check_plan(self.rounds_left, self.config.federation.fraction_train)
        return budget

    # ---- the start and the end of a run ------------------------------------------------------------------
    def load_task(self) -> None:
        """Load the family's models (`self.model` among them) and evaluation data."""
        raise NotImplementedError

    def initial_arrays(self) -> ArrayRecord:
        """The fresh adapter, or the checkpointed one when this run resumes an interrupted one."""
        if self.checkpoint is not None:
            log(
                INFO,
                "[fedpt-app] resuming from the checkpoint of round %d in %s",
                self.resumed_round,
                self.metrics.output_dir,
            )
            self.checkpoint.restore_rng()
            self.restore_server_state(self.checkpoint.server_state)
            return to_array_record(self.checkpoint.adapter, "float32")
        return to_array_record(self.model.initial_adapter_state, "float32")

    @property
    def rounds_left(self) -> int:
        return self.config.federation.num_server_rounds - self.resumed_round

    def finish(self, final_arrays: ArrayRecord, completed_round: int | None = None) -> dict:
        """Save the final adapter (loadable with `PeftModel.from_pretrained`) and summary.json; `completed_round`
        when the run ended before its last round (its privacy budget spent)."""
        final_state = from_array_record(final_arrays)
        saved_model = self.model_to_save(final_state)
        rounds = self.config.federation.num_server_rounds if completed_round is None else completed_round
        save_checkpoint(
            self.metrics.output_dir,
            Checkpoint.capture(rounds, final_state, self.metrics.run_config, finished=True),
        )
        adapter_dir = self.metrics.output_dir / "adapter"
        saved_model.save_pretrained(adapter_dir)
        other_dirs = {}
        for name, state in self.other_adapters().items():
            load_adapter_state(saved_model, state)
            saved_model.save_pretrained(self.metrics.output_dir / name)
            other_dirs[f"{name.replace('-', '_')}_dir"] = str(self.metrics.output_dir / name)
        summary = self.metrics.write_summary(
            {
                "algorithm": self.config.algorithm,
                "adapter_dir": str(adapter_dir),
                **other_dirs,
                **self.summary_fields(),
                **self._privacy_spent(),
            }
        )
        log(INFO, "[fedpt-app] metrics: %s", self.metrics.path)
        log(INFO, "[fedpt-app] adapter: %s", adapter_dir)
        if summary["final"] is None:
            log(WARNING, "[fedpt-app] no evaluation ran (eval-interval=0)")
        return summary

    def _privacy_spent(self) -> dict[str, float]:
        if self.privacy_budget is None:
            return {}
        return {"epsilon": self.privacy_budget.epsilon(), "dp_delta": self.config.privacy.dp_delta}

    # ---- what a round sends --------------------------------------------------------------------------------
    # Flower numbers the rounds of `start()` from 1; a resumed run's round r is Flower's r + resumed_round.
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        round_config, wire_arrays = self.open_round(server_round + self.resumed_round, arrays)
        node_ids = self.sample(grid)
        self.count_sent(len(node_ids), wire_arrays)
        return [self.message_to(node_id, round_config, wire_arrays) for node_id in node_ids]

    def open_round(self, number: int, arrays: ArrayRecord) -> tuple[RoundConfig, ArrayRecord]:
        """Start the round's record; (its config for the clients, the adapter as it goes on the wire)."""
        self.round = RoundState(number, lr=self.config.round_lr(number))
        wire_arrays = to_array_record(from_array_record(arrays), self.config.federation.wire_dtype)
        self.round.broadcast = from_array_record(wire_arrays)  # what clients start from, as they decode it
        return self.round_config(number), wire_arrays

    def sample(self, grid: Grid) -> list[int]:
        """The round's clients, by the schedule of the run's seed (see fedpt_app.federation.schedule)."""
        node_ids, self.round.clients_sampled, connected = self.schedule.sample(grid, self.round.number)
        if self.privacy_budget is not None:
            self.round.dp_sample_rate = len(node_ids) / connected
            self.privacy_budget.check_round(self.round.number, self.round.dp_sample_rate)
        return node_ids

    def count_sent(self, clients: int, wire_arrays: ArrayRecord) -> None:
        self.round.sent = clients
        self.round.bytes_down = wire_arrays.count_bytes() * clients

    def message_to(self, node_id: int, round_config: RoundConfig, wire_arrays: ArrayRecord) -> Message:
        node_config, records = self.deliveries(node_id, round_config)
        self.round.bytes_down += sum(record.count_bytes() for record in records.values())
        content = RecordDict({ARRAYS_KEY: wire_arrays, CONFIG_KEY: node_config.to_record(), **records})
        return Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)

    def round_config(self, number: int) -> RoundConfig:
        """What every client of the round is told; families add their fields."""
        privacy = self.config.privacy
        return RoundConfig(
            server_round=number,
            lr=self.round.lr,
            clipping_norm=privacy.dp_clipping_norm if privacy.dp_mode == "client" else None,
        )

    def deliveries(self, node_id: int, round_config: RoundConfig) -> tuple[RoundConfig, dict[str, ArrayRecord]]:
        """(this node's round config, the records it needs besides the adapter); by default nothing more."""
        return round_config, {}

    # ---- what a round receives -----------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        usable, norms = self.screen_replies(replies)
        timeouts = self.check_enough_replies(len(replies), len(usable))
        metrics = [ReplyMetrics.from_record(msg.content[METRICS_KEY]) for msg in usable]
        weights = [float(reply.num_examples) for reply in metrics]
        global_state = self.aggregate([from_array_record(msg.content[ARRAYS_KEY]) for msg in usable], weights)
        self.round.failures = sum(msg.has_error() for msg in replies) + timeouts
        self.round.rejected = sum(not msg.has_error() for msg in replies) - len(usable)
        self.round.update_norm_max = max(norms)
        self.round.bytes_up = sum(
            record.count_bytes() for msg in usable for record in msg.content.array_records.values()
        )
        return self.complete_round(global_state, metrics)

    def screen_replies(self, replies: list[Message]) -> tuple[list[Message], list[float]]:
        """(usable replies in a content-defined order, their update norms); each dropped reply's 'node N: reason'
        goes to the round's problems.

        The order makes the float sums of FedAvg independent of the order in which replies arrived, so a resumed
        run aggregates bit for bit like an uninterrupted one.
        """
        max_norm = self.config.federation.max_update_norm or math.inf
        privacy = self.config.privacy
        if privacy.dp_mode == "client":  # devices promised to clip: hold them to it (float16 rounding aside)
            max_norm = min(max_norm, privacy.dp_clipping_norm * 1.001)
        rules = UpdateRules(
            self.round.broadcast,
            self.config.federation.wire_dtype,
            max_norm if max_norm < math.inf else 0.0,
            self.config.federation.max_num_examples,
            self.reply_records(),
        )
        usable, norms = [], []
        for msg in replies:
            verdict = check_reply(msg, rules)
            if verdict.problem is None:
                usable.append(msg)
                norms.append(verdict.update_norm)
            else:
                self.round.problems.append(f"node {msg.metadata.src_node_id}: {verdict.problem}")
                log(WARNING, "[fedpt-app] dropped the reply of node %d: %s", msg.metadata.src_node_id, verdict.problem)
        usable.sort(key=content_digest)
        self.accept_replies(usable, [msg for msg in replies if msg.has_error()])
        return usable, norms

    def reply_records(self) -> dict[str, Callable[[object, MetricRecord], str | None]]:
        """Records this round's replies must hold besides adapter and metrics, each with its check."""
        return {}

    def accept_replies(self, usable: list[Message], errors: list[Message]) -> None:
        """See the round's usable replies before they are aggregated, and its error replies; nothing by default."""

    def check_enough_replies(self, replies: int, usable: int) -> int:
        """The number of sampled clients that never replied; stops the run below `min-train-nodes`."""
        number, sent = self.round.number, self.round.sent
        timeouts = sent - replies
        if timeouts:
            log(
                WARNING,
                "[fedpt-app] round %d: %d sampled client(s) did not reply within round-timeout=%gs",
                number,
                timeouts,
                self.config.federation.round_timeout,
            )
        if usable < self.min_train_nodes:
            problems = "; ".join(self.round.problems) or "no other problems"
            raise RoundFailedError(
                f"Round {number}: only {usable} usable replies from {sent} sampled clients (min-train-nodes="
                f"{self.min_train_nodes}); {timeouts} timed out; {problems}. The global adapter of round {number - 1} "
                "is kept in the checkpoint: rerun with the same output-dir to resume."
            )
        return timeouts

    def aggregate(self, states: list[dict[str, torch.Tensor]], weights: list[float]) -> State:
        """FedAvg weighted by num-examples; with differential privacy, the clipped, noised uniform mean."""
        privacy = self.config.privacy
        if privacy.dp_mode == "off":
            return fedavg(states, weights)
        if privacy.dp_mode == "server":
            states = [clipped(state, self.round.broadcast, privacy.dp_clipping_norm) for state in states]
        state, self.round.dp_noise_stdv = noisy_mean(states, privacy.dp_clipping_norm, privacy.dp_noise_multiplier)
        if self.privacy_budget is not None:
            self.round.epsilon, self.round.dp_delta = (
                self.privacy_budget.spend(self.round.dp_sample_rate),
                privacy.dp_delta,
            )
        return state

    def complete_round(self, global_state: State, metrics: list[ReplyMetrics]) -> tuple[ArrayRecord, MetricRecord]:
        """The server step on the aggregate, and the round's training bookkeeping."""
        weights = [float(reply.num_examples) for reply in metrics]
        server_started = time.perf_counter()
        global_state = self.server_step(self.round.number, global_state)
        train_loss = sum(float(reply.train_loss) * w for reply, w in zip(metrics, weights, strict=True)) / sum(weights)
        record = self.round
        record.clients, record.num_examples, record.train_loss = len(metrics), int(sum(weights)), train_loss
        record.client_train_seconds = max(float(reply.train_seconds) for reply in metrics)
        record.client_model_loads = max(int(reply.model_loads) for reply in metrics)
        record.client_peak_rss_mb = max(float(reply.peak_rss_mb) for reply in metrics)
        record.client_cuda_peak_mb = max(float(reply.cuda_peak_mb) for reply in metrics)
        record.client_rows_truncated = sum(int(reply.rows_truncated) for reply in metrics)
        record.server_step_seconds = time.perf_counter() - server_started
        if torch.cuda.is_available():  # the server's models: the large one (evaluation, teacher) and the small
            record.server_cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20
        return to_array_record(global_state, "float32"), MetricRecord({"train-loss": train_loss})

    def server_step(self, server_round: int, state: State) -> State:
        """The algorithm's own work after aggregation; none by default."""
        return state

    # ---- evaluation and bookkeeping ------------------------------------------------------------------------
    def evaluation_due(self, server_round: int) -> bool:
        interval = self.config.evaluation.eval_interval
        return interval > 0 and (
            server_round % interval == 0 or server_round == self.config.federation.num_server_rounds
        )

    def evaluate_models(self, server_round: int, state: State) -> dict[str, float]:
        """The scores of every model this algorithm reports, with the global adapter `state`."""
        raise NotImplementedError

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's `evaluate_fn`: runs after every round (and at round 0); writes the round's metrics row and
        the checkpoint."""
        self.latest_arrays = arrays
        if server_round == 0 and self.resumed_round:
            return None  # evaluated and recorded before the interruption
        number = server_round + self.resumed_round
        eval_started = time.perf_counter()
        if number == 0:
            self.round = RoundState(0, started=eval_started)
        state = from_array_record(arrays)
        scores = self.evaluate_models(number, state) if self.evaluation_due(number) else {}
        finished = time.perf_counter()
        row = {
            "round": number,
            "algorithm": self.config.algorithm,
            "train_loss": None,
            "bytes_up": 0,
            "bytes_down": 0,
            **self.round.row(),
            **dict.fromkeys(self.score_names),
            **scores,
            "eval_seconds": finished - eval_started,
            "round_seconds": finished - self.round.started,
            "server_model_loads": sum(LOAD_COUNTS.values()),
        }
        self.metrics.append(row, self.config.federation.num_server_rounds)
        if number > 0:
            save_checkpoint(
                self.metrics.output_dir,
                Checkpoint.capture(number, state, self.metrics.run_config, server_state=self.server_state()),
            )
        return MetricRecord(scores) if scores else None

    def server_state(self) -> dict[str, torch.Tensor]:
        """State besides the adapter that the next round depends on (checkpointed with it); none by default."""
        return {}

    def restore_server_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back `server_state()` from the checkpoint of an interrupted run."""

    def model_to_save(self, state: State) -> PeftModel:
        """The peft model whose adapter `finish` saves, carrying the final state."""
        load_adapter_state(self.model, state)
        return self.model

    def other_adapters(self) -> dict[str, State]:
        """Adapters of the same model that `finish` saves beside the final one, by folder name; none by default."""
        return {}

    def summary_fields(self) -> dict[str, str]:
        """What summary.json says about the models, besides the scores."""
        return {}
