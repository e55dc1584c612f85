"""ServerApp main: validate the configuration, build the algorithm's strategy, run it, save the results."""

from __future__ import annotations

import random
from logging import INFO

import torch
from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedpt_app.config import RunConfig
from fedpt_app.strategies import STRATEGIES


def run_server(grid: Grid, context: Context) -> dict:
    config = RunConfig.from_mapping(context.run_config)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    log(INFO, "[fedpt-app] algorithm=%s preset=%s small-model=%s dataset=%s output-dir=%s", config.algorithm,
        config.preset, config.small_model, config.dataset, config.output_path())
    strategy = STRATEGIES[config.algorithm](config)  # loads models and data: bad input fails here, before round 1
    result = strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(),
                            num_rounds=config.num_server_rounds, train_config=ConfigRecord(),
                            evaluate_fn=strategy.evaluate_round)
    return strategy.finish(result.arrays)
