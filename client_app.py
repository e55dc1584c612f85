"""Flower ClientApp entry point (thin): the device task of the run's method family does the work."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpt_app.device import dispatch
from fedpt_app.device.mods import clip_when_asked_mod, secure_aggregation_mod

app = ClientApp(mods=[secure_aggregation_mod, clip_when_asked_mod])


@app.query("identity")
def identify(msg: Message, context: Context) -> Message:
    return dispatch.identify(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return dispatch.train(msg, context)
