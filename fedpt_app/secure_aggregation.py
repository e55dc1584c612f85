"""Secure aggregation with Flower's SecAgg+: `SecAggPlusWorkflow` on the server, `secaggplus_mod` on the devices.

Flower (1.42) offers SecAgg+ only inside its legacy round workflow (`DefaultWorkflow` driving a fit/evaluate
`flwr.server.strategy.Strategy` through a `LegacyContext`), not for the Message-API strategies this app is built
on. Two small bridges connect them without a second implementation of any algorithm:

- `LegacyBridge` presents an algorithm's strategy to that workflow: the same round config, server step
  (FedPT's distillation), evaluation, metrics and checkpoints as in a plain run;
- `secure_aggregation_mod` hands SecAgg+ rounds to `secaggplus_mod` and translates its legacy fit messages to and
  from the app's own train messages (other rounds pass through untouched).

The server then learns only the weighted sum of the sampled clients' adapters, never one client's: the per-reply
checks of `fedpt_app.validation` cannot run, so the aggregate is checked instead (finite values).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (Code, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, Status,
                         ndarrays_to_parameters, parameters_to_ndarrays)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedpt_app.config import RunConfig
from fedpt_app.messages import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from fedpt_app.models.lora import from_array_record
from fedpt_app.strategies.fedavg import FedAvgLora, RoundFailedError


def run_with_secure_aggregation(grid: Grid, context: Context, strategy: FedAvgLora,
                                initial_arrays: ArrayRecord) -> ArrayRecord:
    """Run the strategy's remaining rounds under SecAgg+; return the final global adapter."""
    config = strategy.config
    bridge = LegacyBridge(strategy, initial_arrays)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=strategy.rounds_left), strategy=bridge)
    workflow = SecAggPlusWorkflow(num_shares=config.secagg_num_shares,
                                  reconstruction_threshold=config.secagg_reconstruction_threshold,
                                  max_weight=config.secagg_max_weight, timeout=config.round_timeout)
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    return bridge.latest


class LegacyBridge(Strategy):
    """An algorithm's strategy as the legacy fit/evaluate Strategy that SecAggPlusWorkflow drives."""

    def __init__(self, strategy: FedAvgLora, initial_arrays: ArrayRecord) -> None:
        self.strategy = strategy
        self.keys: list[str] = list(initial_arrays)
        self.latest = initial_arrays

    def _to_parameters(self, arrays: ArrayRecord) -> Parameters:
        return ndarrays_to_parameters([array.numpy() for array in arrays.values()])

    def _to_arrays(self, parameters: Parameters) -> ArrayRecord:
        return ArrayRecord(OrderedDict((key, Array(np.ascontiguousarray(values, dtype=np.float32)))
                                       for key, values in zip(self.keys, parameters_to_ndarrays(parameters))))

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return self._to_parameters(self.latest)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        server_round += self.strategy.resumed_round
        entries, wire_arrays = self.strategy.begin_round(server_round, self._to_arrays(parameters))
        config = self.strategy.config
        wanted = max(math.ceil(config.fraction_train * client_manager.num_available()), config.min_train_nodes)
        clients = client_manager.sample(num_clients=wanted, min_num_clients=config.min_train_nodes)
        self.strategy.count_sent(len(clients), wire_arrays)
        fit_ins = FitIns(self._to_parameters(wire_arrays), {**entries, "server-round": server_round})
        return [(client, fit_ins) for client in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        """SecAgg+ has already replaced every result's parameters by the weighted average of all of them."""
        server_round += self.strategy.resumed_round
        problems = [f"client failure: {failure}" for failure in failures]
        self.strategy.check_enough_replies(server_round, len(results) + len(failures), len(results), problems)
        aggregate = from_array_record(self._to_arrays(results[0][1].parameters))
        if not all(torch.isfinite(tensor).all() for tensor in aggregate.values()):
            raise RoundFailedError(f"Round {server_round}: the securely aggregated adapter holds NaN or infinite "
                                   "values; a client sent a broken update, which secure aggregation hides.")
        self.strategy._round.update({"failures": len(failures), "rejected": 0, "problems": problems,
                                     "bytes_up": None, "secure_aggregation": "secagg+"})
        metrics = [{**result.metrics, "num-examples": result.num_examples} for _, result in results]
        arrays, _ = self.strategy.complete_round(server_round, aggregate, metrics)
        return self._to_parameters(arrays), {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        self.latest = self._to_arrays(parameters)
        scores = self.strategy.evaluate_round(server_round, self.latest)
        return (0.0, dict(scores)) if scores else None

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # evaluation is central

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """`secaggplus_mod` for SecAgg+ rounds (their messages carry its config record); other messages pass."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda fit_msg, ctx: _train_from_legacy_fit(fit_msg, ctx, call_next))


def _train_from_legacy_fit(msg: Message, context: Context, train: ClientAppCallable) -> Message:
    """Run the app's train task on a legacy fit message, and answer in the legacy fit-result layout."""
    from fedpt_app.client import adapter_keys  # the ClientApp's model decides the keys' order

    fit_ins = recorddict_to_fitins(msg.content, keep_input=True)
    config = RunConfig.from_mapping(context.run_config)
    keys = adapter_keys(config, str(fit_ins.config.get("model", "small")))
    arrays = ArrayRecord(OrderedDict((key, Array(values))
                                     for key, values in zip(keys, parameters_to_ndarrays(fit_ins.parameters),
                                                            strict=True)))
    msg.content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord(dict(fit_ins.config))})
    reply = train(msg, context)
    if reply.has_error():
        return reply
    metrics = dict(reply.content[METRICS_KEY])
    fit_res = FitRes(Status(Code.OK, "ok"),
                     ndarrays_to_parameters([array.numpy() for array in reply.content[ARRAYS_KEY].values()]),
                     int(metrics.pop("num-examples")), metrics)
    reply.content = fitres_to_recorddict(fit_res, keep_input=True)
    return reply
