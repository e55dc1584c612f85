"""The classify family's device task (FedPFT, FedPETuning, FedOT): train LoRA and the head on the base model the
server sent (fedpt_app.classify.base_store), counting APoZ first on FedPFT's alignment rounds."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from peft import PeftModel

from fedpt_app.classify.base_store import receive_base
from fedpt_app.classify.compression.apoz import count_zero_activations
from fedpt_app.classify.compression.ffn import find_ffns
from fedpt_app.classify.data import read_classification_file, rows_kind, training_rows
from fedpt_app.classify.inputs import check_inputs_match, model_inputs
from fedpt_app.config import ClassifyConfig, RunConfig
from fedpt_app.device.node import Node, local_seed
from fedpt_app.device.partition import PartitionSpec, node_source, source_rows
from fedpt_app.device.reply import train_reply
from fedpt_app.device.training import train_lora
from fedpt_app.models.lora import from_array_record, load_adapter_state
from fedpt_app.protocol import APOZ_KEY, ARRAYS_KEY, CONFIG_KEY, ProtocolError, RoundConfig

PARTITION_COLUMN = "label"  # what the non-IID partitioners skew over


@functools.cache
def _local_examples(
    source: PartitionSpec | str, partition_id: int, model_ref: str, max_length: int, label_names: tuple[str, ...]
) -> tuple[tuple[dict, ...], int]:
    """(this node's encoded training rows, how many were cut at max-length), prepared once per process; the labels
    of a device's own data file are mapped by name onto the run's `label_names`."""
    rows = source_rows(source, partition_id, lambda path: read_classification_file(path, label_names)[0], training_rows)
    inputs = model_inputs(model_ref)
    check_inputs_match(inputs, rows_kind(rows), source if isinstance(source, str) else source.dataset)
    return tuple(inputs.encode(rows, max_length)), inputs.count_truncated(rows, max_length)


def _count_apoz(model: PeftModel, classify: ClassifyConfig, batches: Iterable[dict]) -> ArrayRecord:
    """Zero-activation counts of the compressed layers' neurons on local data (before this round's training)."""
    layers = classify.compressed_layer_indices(len(find_ffns(model)))
    counts, tokens = count_zero_activations(model, layers, batches)
    return ArrayRecord(
        {
            **{f"layer-{layer}": Array(counts[layer].numpy()) for layer in layers},
            "tokens": Array(np.array([tokens], dtype=np.float64)),
        }
    )


def train(msg: Message, context: Context, config: RunConfig) -> Message:
    """Apply the global adapter and head to the base, (count APoZ,) train, reply with adapter and metrics."""
    node = Node.from_node_config(context.node_config)
    node.use_model_cache()
    source = node_source(node, config.data, PARTITION_COLUMN, config.seed)
    round_config = RoundConfig.from_record(msg.content[CONFIG_KEY])
    if round_config.base is None:
        raise ProtocolError("A classify round config names no base model (base-id)")
    foundation_model, training = config.classify.foundation_model, config.training
    inputs = model_inputs(foundation_model)
    if round_config.label_names is None:
        raise ProtocolError("A classify round config names no labels (label-names)")
    examples, truncated = _local_examples(
        source, node.index, foundation_model, training.max_length, round_config.label_names
    )
    model = receive_base(msg, round_config.base, config.lora, config.seed, node.storage_key)
    load_adapter_state(model, from_array_record(msg.content[ARRAYS_KEY]))
    records = {}
    if round_config.count_apoz:
        records[APOZ_KEY] = _count_apoz(model, config.classify, inputs.batches(examples, training.batch_size))
    server_round = round_config.server_round
    result = train_lora(
        model,
        examples,
        inputs.batches,
        epochs=training.local_epochs,
        lr=round_config.lr,
        batch_size=training.batch_size,
        pad_token_id=inputs.pad_token_id,
        seed=local_seed(config.seed, server_round, node.index),
        max_steps=config.local_step_cap(),
        description=f"client {node.index} round {server_round}",
    )
    return train_reply(msg, model, result, config.federation.wire_dtype, truncated, records)
