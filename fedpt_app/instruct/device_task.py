"""The instruct family's device task: LoRA-tune the model of the pair the server names (the small one, or the large
one for FedAvg-large) on this device's instructions, and reply with the adapter."""

from __future__ import annotations

import functools
from logging import INFO

from flwr.app import Context, Message
from flwr.common.logger import log

from fedpt_app.config import RunConfig
from fedpt_app.device.node import Node, local_seed
from fedpt_app.device.partition import PartitionSpec, node_source, source_rows
from fedpt_app.device.reply import train_reply
from fedpt_app.device.training import train_lora
from fedpt_app.instruct.data import read_rows_file, training_rows
from fedpt_app.instruct.prompts import TokenizedExample, Truncation, batches, tokenize_rows
from fedpt_app.models.loading import load_tokenizer
from fedpt_app.models.lora import LoraSpec, adapter_state, from_array_record, load_adapter_state, lora_model
from fedpt_app.protocol import ARRAYS_KEY, CONFIG_KEY, ProtocolError, RoundConfig

PARTITION_COLUMN = "category"  # what the non-IID partitioners skew over


@functools.cache
def _local_examples(
    source: PartitionSpec | str, partition_id: int, model_ref: str, max_length: int, prompt_budget: int
) -> tuple[tuple[TokenizedExample, ...], Truncation]:
    """This node's tokenized training rows (its partition, or its own data file), prepared once per process."""
    rows = source_rows(source, partition_id, read_rows_file, training_rows)
    examples, truncation = tokenize_rows(load_tokenizer(model_ref), rows, max_length, prompt_budget)
    log(INFO, "%s", truncation.describe(f"node {partition_id}'s training rows"))
    return tuple(examples), truncation


def trained_model(config: RunConfig, role: str | None) -> tuple[str, str]:
    """(model reference, quantization) of the model the server asked this round to tune."""
    if role == "large":  # FedAvg-large: QLoRA when the large model is quantized
        return config.instruct.large_model, config.instruct.large_model_quantization
    if role == "small":
        return config.instruct.small_model, "none"
    raise ValueError(f"The server asked to train model {role!r}; expected 'small' or 'large'")


def adapter_keys(config: RunConfig, round_config: RoundConfig) -> list[str]:
    """The names of the adapter tensors this device trains, in the order the server sends them."""
    model_ref, quantization = trained_model(config, round_config.trained_model)
    return list(adapter_state(lora_model(model_ref, LoraSpec.from_settings(config.lora), quantization, config.seed)))


def train(msg: Message, context: Context, config: RunConfig) -> Message:
    """Apply the global adapter, train it on local data, reply with the adapter and scalar metrics only."""
    node = Node.from_node_config(context.node_config)
    node.use_model_cache()
    source = node_source(node, config.data, PARTITION_COLUMN, config.seed)
    round_config = RoundConfig.from_record(msg.content[CONFIG_KEY])
    model_ref, quantization = trained_model(config, round_config.trained_model)
    if round_config.prompt_budget is None:
        raise ProtocolError("An instruct round config names no prompt budget (prompt-budget)")
    examples, truncation = _local_examples(
        source, node.index, model_ref, config.training.max_length, round_config.prompt_budget
    )
    model = lora_model(model_ref, LoraSpec.from_settings(config.lora), quantization, config.seed)
    load_adapter_state(model, from_array_record(msg.content[ARRAYS_KEY]))
    server_round = round_config.server_round
    result = train_lora(
        model,
        examples,
        batches,
        epochs=config.training.local_epochs,
        lr=round_config.lr,
        batch_size=config.training.batch_size,
        pad_token_id=load_tokenizer(model_ref).pad_token_id,
        seed=local_seed(config.seed, server_round, node.index),
        max_steps=config.local_step_cap(),
        description=f"client {node.index} round {server_round}",
    )
    return train_reply(msg, model, result, config.federation.wire_dtype, truncation.rows_cut)
