"""The app's real ClientApp with faults injected into training, for the fault-tolerance test: by partition id,
0 and 1 are honest, 2 crashes mid-round, 3 sends NaN, 4 sends a tensor of the wrong shape. Every node still says
who it is when the server asks."""

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedpt_app.device import dispatch
from fedpt_app.protocol import ARRAYS_KEY


def inject_faults(msg: Message, context: Context, call_next) -> Message:
    partition = int(context.node_config["partition-id"])
    if partition == 2:
        raise RuntimeError("injected fault: this device crashed mid-round")
    reply = call_next(msg, context)
    if partition in (3, 4):
        arrays = list(reply.content[ARRAYS_KEY].items())
        first_key, first = arrays[0]
        values = first.numpy()
        broken = np.full_like(values, np.nan) if partition == 3 else np.ascontiguousarray(values[:, :-1])
        reply.content[ARRAYS_KEY] = ArrayRecord({first_key: Array(broken), **dict(arrays[1:])})
    return reply


app = ClientApp()


@app.query("identity")
def identify(msg: Message, context: Context) -> Message:
    return dispatch.identify(msg, context)


@app.train(mods=[inject_faults])
def train(msg: Message, context: Context) -> Message:
    return dispatch.train(msg, context)
