"""What the server knows about the round in progress: one record per round, owned by the base strategy.

The base strategy fills the shared fields as the round goes (configure, screen, aggregate, server step); a family
strategy adds its own figures with `note(...)` (FedPT's distillation loss, FedPFT's alignment). `row()` gives the
round's fields of the metrics.jsonl row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RoundState:
    number: int
    started: float = field(default_factory=time.perf_counter)
    broadcast: dict[str, torch.Tensor] = field(default_factory=dict)  # the adapter as the clients decode it
    lr: float | None = None  # None: no training this round (round 0)
    clients_sampled: list[str] = field(default_factory=list)  # the identities of the round's clients
    sent: int = 0  # clients the round's messages went to
    bytes_down: int = 0
    bytes_down_model: int | None = None  # classify family: client bases and FFN updates (inside bytes_down)
    # screening and aggregation
    failures: int = 0  # errors and timeouts
    rejected: int = 0
    problems: list[str] = field(default_factory=list)
    update_norm_max: float | None = None  # None under secure aggregation (the server sees no single update)
    bytes_up: int | None = 0  # every array record of the usable replies (adapter, APoZ); None: not counted (SecAgg+)
    dp_noise_stdv: float | None = None
    dp_sample_rate: float | None = None  # with DP: sampled / connected clients, the accountant's q
    epsilon: float | None = None  # with DP: the ε spent after this round, at δ = dp_delta
    dp_delta: float | None = None
    secure_aggregation: str | None = None
    # the usable replies
    clients: int = 0
    num_examples: int = 0
    train_loss: float | None = None
    client_train_seconds: float = 0.0
    client_model_loads: int = 0
    client_peak_rss_mb: float = 0.0
    client_cuda_peak_mb: float = 0.0
    client_rows_truncated: int = 0  # training rows cut to fit max-length, summed over the clients
    server_step_seconds: float = 0.0
    server_cuda_peak_mb: float | None = None  # the server process's CUDA peak so far (None without a GPU)
    notes: dict[str, Any] = field(default_factory=dict)  # the algorithm's own figures

    def note(self, **figures: Any) -> None:
        self.notes.update(figures)

    def row(self) -> dict[str, Any]:
        """This round's training fields of its metrics.jsonl row ({} for round 0); optional fields appear only
        where they apply."""
        if self.lr is None:
            return dict(self.notes)
        row: dict[str, Any] = {"lr": self.lr, "clients_sampled": self.clients_sampled, "bytes_down": self.bytes_down}
        row.update(_present(bytes_down_model=self.bytes_down_model))
        row.update({"failures": self.failures, "rejected": self.rejected, "problems": self.problems})
        row.update(_present(update_norm_max=self.update_norm_max))
        row["bytes_up"] = self.bytes_up
        row.update(
            _present(
                dp_noise_stdv=self.dp_noise_stdv,
                dp_sample_rate=self.dp_sample_rate,
                epsilon=self.epsilon,
                dp_delta=self.dp_delta,
                secure_aggregation=self.secure_aggregation,
            )
        )
        row.update(
            {
                "clients": self.clients,
                "num_examples": self.num_examples,
                "train_loss": self.train_loss,
                "client_train_seconds": self.client_train_seconds,
                "client_model_loads": self.client_model_loads,
                "client_peak_rss_mb": self.client_peak_rss_mb,
                "client_cuda_peak_mb": self.client_cuda_peak_mb,
                "client_rows_truncated": self.client_rows_truncated,
                "server_step_seconds": self.server_step_seconds,
            }
        )
        row.update(_present(server_cuda_peak_mb=self.server_cuda_peak_mb))
        return {**row, **self.notes}


def _present(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}
