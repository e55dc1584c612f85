"""Flower ClientApp entry point (thin): the work lives in fedpt_app.client."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpt_app import client

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return client.train(msg, context)
