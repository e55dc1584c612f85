"""The ClientApp's train handler: hand the message to the device task of the run's method family."""

from __future__ import annotations

from flwr.app import Context, Message

from fedpt_app import algorithms
from fedpt_app.config import RunConfig


def train(msg: Message, context: Context) -> Message:
    config = RunConfig.from_mapping(context.run_config)
    return algorithms.device_task(config.algorithm).train(msg, context, config)
