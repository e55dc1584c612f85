"""Flower ClientApp entry point (thin): the work lives in fedpt_app.client."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpt_app import classifier_client, client
from fedpt_app.config import CLASSIFICATION, GENERATION, RunConfig
from fedpt_app.privacy import clip_when_asked_mod
from fedpt_app.secure_aggregation import secure_aggregation_mod

app = ClientApp(mods=[secure_aggregation_mod, clip_when_asked_mod])
TASKS = {GENERATION: client.train, CLASSIFICATION: classifier_client.train}


@app.train()
def train(msg: Message, context: Context) -> Message:
    return TASKS[RunConfig.from_mapping(context.run_config).task](msg, context)
