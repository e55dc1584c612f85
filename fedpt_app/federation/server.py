"""ServerApp main: validate the configuration, build the algorithm's strategy, run it, save the results."""

from __future__ import annotations

import random
from logging import INFO, WARNING

import torch
from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedpt_app import algorithms
from fedpt_app.config import RunConfig
from fedpt_app.federation.privacy import PrivacyBudgetSpent
from fedpt_app.federation.secure_aggregation import run_with_secure_aggregation


def run_server(grid: Grid, context: Context) -> dict:
    config = RunConfig.from_mapping(context.run_config)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    log(
        INFO,
        "[fedpt-app] algorithm=%s preset=%s dataset=%s output-dir=%s",
        config.algorithm,
        config.preset,
        config.data.dataset,
        config.output_path(),
    )
    strategy = algorithms.strategy_class(config.algorithm)(config)  # loads models and data: bad input fails here
    initial_arrays = strategy.initial_arrays()  # the checkpoint's adapter when resuming an interrupted run
    if strategy.rounds_left == 0:  # interrupted after its last round, before saving the results
        return strategy.finish(initial_arrays)
    if config.privacy.secure_aggregation:
        return strategy.finish(run_with_secure_aggregation(grid, context, strategy, initial_arrays))
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=strategy.rounds_left,
            timeout=config.federation.round_timeout,
            train_config=ConfigRecord(),
            evaluate_fn=strategy.evaluate_round,
        )
    except PrivacyBudgetSpent as spent:
        log(WARNING, "[fedpt-app] %s", spent)
        return strategy.finish(strategy.latest_arrays, completed_round=strategy.round.number - 1)
    return strategy.finish(result.arrays)
