"""The ClientApp's handlers: name this node when the server asks, and hand a train message to the device task of
the run's method family."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpt_app import algorithms
from fedpt_app.config import RunConfig
from fedpt_app.device.node import Node
from fedpt_app.protocol import IDENTITY_KEY


def identify(msg: Message, context: Context) -> Message:
    identity = Node.from_node_config(context.node_config).identity
    return Message(content=RecordDict({IDENTITY_KEY: ConfigRecord({"name": identity})}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    config = RunConfig.from_mapping(context.run_config)
    return algorithms.device_task(config.algorithm).train(msg, context, config)
