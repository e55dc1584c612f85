"""Secure aggregation with Flower's SecAgg+: `SecAggPlusWorkflow` on the server, `secaggplus_mod` on the devices.

Flower (1.42) offers SecAgg+ only inside its legacy round workflow (`DefaultWorkflow` driving a fit/evaluate
`flwr.server.strategy.Strategy` through a `LegacyContext`), not for the Message-API strategies this app is built
on. Two small bridges connect them without a second implementation of any algorithm:

- `LegacyBridge` presents an algorithm's strategy to that workflow: the same round config, server step
  (FedPT's distillation), evaluation, metrics and checkpoints as in a plain run;
- on the devices, `secure_aggregation_mod` (fedpt_app/device/mods.py) hands SecAgg+ rounds to `secaggplus_mod` and
  translates its legacy fit messages to and from the app's own train messages.

The server then learns only the weighted sum of the sampled clients' adapters, never one client's: the per-reply
checks of `fedpt_app.federation.screening` cannot run, so the aggregate is checked instead (finite values).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedpt_app.federation.screening import RoundFailedError
from fedpt_app.federation.strategy import FederatedStrategy
from fedpt_app.models.lora import from_array_record
from fedpt_app.protocol import ReplyMetrics


def run_with_secure_aggregation(
    grid: Grid, context: Context, strategy: FederatedStrategy, initial_arrays: ArrayRecord
) -> ArrayRecord:
    """Run the strategy's remaining rounds under SecAgg+; return the final global adapter."""
    privacy = strategy.config.privacy
    bridge = LegacyBridge(strategy, initial_arrays, grid)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=strategy.rounds_left), strategy=bridge)
    workflow = SecAggPlusWorkflow(
        num_shares=privacy.secagg_num_shares,
        reconstruction_threshold=privacy.secagg_reconstruction_threshold,
        max_weight=privacy.secagg_max_weight,
        timeout=strategy.config.federation.round_timeout,
    )
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    return bridge.latest


class LegacyBridge(Strategy):
    """An algorithm's strategy as the legacy fit/evaluate Strategy that SecAggPlusWorkflow drives."""

    def __init__(self, strategy: FederatedStrategy, initial_arrays: ArrayRecord, grid: Grid) -> None:
        self.strategy, self.grid = strategy, grid  # the grid: to ask new nodes who they are (the client schedule)
        self.keys: list[str] = list(initial_arrays)
        self.latest = initial_arrays

    def _to_parameters(self, arrays: ArrayRecord) -> Parameters:
        return ndarrays_to_parameters([array.numpy() for array in arrays.values()])

    def _to_arrays(self, parameters: Parameters) -> ArrayRecord:
        return ArrayRecord(
            OrderedDict(
                (key, Array(np.ascontiguousarray(values, dtype=np.float32)))
                for key, values in zip(self.keys, parameters_to_ndarrays(parameters), strict=True)
            )
        )

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return self._to_parameters(self.latest)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        round_config, wire_arrays = self.strategy.open_round(
            server_round + self.strategy.resumed_round, self._to_arrays(parameters)
        )
        proxies = client_manager.all()  # the workflow's view of the nodes, keyed by node id
        clients = [proxies[str(node_id)] for node_id in self.strategy.sample(self.grid) if str(node_id) in proxies]
        self.strategy.count_sent(len(clients), wire_arrays)
        fit_ins = FitIns(self._to_parameters(wire_arrays), dict(round_config.to_record()))
        return [(client, fit_ins) for client in clients]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """SecAgg+ has already replaced every result's parameters by the weighted average of all of them."""
        record = self.strategy.round
        record.problems.extend(f"client failure: {failure}" for failure in failures)
        self.strategy.check_enough_replies(len(results) + len(failures), len(results))
        aggregate = from_array_record(self._to_arrays(results[0][1].parameters))
        if not all(torch.isfinite(tensor).all() for tensor in aggregate.values()):
            raise RoundFailedError(
                f"Round {record.number}: the securely aggregated adapter holds NaN or infinite "
                "values; a client sent a broken update, which secure aggregation hides."
            )
        record.failures, record.rejected, record.bytes_up, record.secure_aggregation = len(failures), 0, None, "secagg+"
        metrics = [
            ReplyMetrics.from_record({**result.metrics, "num-examples": result.num_examples}) for _, result in results
        ]
        arrays, _ = self.strategy.complete_round(aggregate, metrics)
        return self._to_parameters(arrays), {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        self.latest = self._to_arrays(parameters)
        scores = self.strategy.evaluate_round(server_round, self.latest)
        return (0.0, dict(scores)) if scores else None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # evaluation is central

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}
