"""ClientApp tasks: what a device does with one round's message."""

from __future__ import annotations

import functools
import os
import resource
from typing import TYPE_CHECKING

import torch

from flwr.app import Context, Message, MetricRecord, RecordDict

from fedpt_app.config import RunConfig
from fedpt_app.data.prompts import TokenizedExample, tokenize_rows
from fedpt_app.data.sources import read_rows_file
from fedpt_app.messages import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from fedpt_app.models.loading import LOAD_COUNTS, load_tokenizer
from fedpt_app.models.lora import LoraSpec, adapter_state, from_array_record, load_adapter_state, lora_model, to_array_record
from fedpt_app.training import train_lora

if TYPE_CHECKING:
    from fedpt_app.data.partition import PartitionSpec


@functools.cache
def _local_examples(source: PartitionSpec | str, partition_id: int, model_ref: str,
                    max_length: int) -> tuple[TokenizedExample, ...]:
    """This node's tokenized training rows (its partition, or its own data file), prepared once per process."""
    if isinstance(source, str):
        rows = read_rows_file(source)
    else:
        from fedpt_app.data.partition import load_partition

        rows = load_partition(source, partition_id)
    return tuple(tokenize_rows(load_tokenizer(model_ref), rows, max_length))


def local_data(context: Context, config: RunConfig) -> tuple[PartitionSpec | str, int]:
    """Where this node's training data comes from, set by the simulation engine or the SuperNode's --node-config:
    `data-file=PATH` (a .jsonl/.csv on this device) or `partition-id=N num-partitions=K` (a partition of the
    configured dataset)."""
    if "data-file" in context.node_config:
        return str(context.node_config["data-file"]), 0
    # imported here: datasets + flwr-datasets cost ~1 s per ClientApp task in deployment (a fresh process each
    # round), which a device training on its own data file never needs
    from fedpt_app.data.partition import PartitionSpec

    partition_id, num_partitions = partition_of(context)
    return PartitionSpec(config.dataset, config.partitioner, num_partitions, config.dirichlet_alpha,
                         config.classes_per_partition, config.test_fraction, config.seed, config.task), partition_id


def partition_of(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config that the simulation engine or SuperNode sets."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as error:
        raise ValueError("This node has no 'partition-id'/'num-partitions' (nor a 'data-file') in its node "
                         "config; start the SuperNode with --node-config 'partition-id=N num-partitions=K'") from error


def use_node_model_cache(context: Context) -> None:
    """`model-cache=DIR` in the node config: where this device keeps (and builds) its models."""
    if "model-cache" in context.node_config:
        os.environ["FEDPT_CACHE"] = str(context.node_config["model-cache"])


def trained_model(config: RunConfig, role: str) -> tuple[str, str]:
    """(model reference, quantization) of the model the server asked this round to tune."""
    if role == "large":  # FedAvg-large: QLoRA when the large model is quantized
        return config.large_model, config.large_model_quantization
    if role == "small":
        return config.small_model, "none"
    raise ValueError(f"The server asked to train model {role!r}; expected 'small' or 'large'")


def adapter_keys(config: RunConfig, role: str) -> list[str]:
    """The names of the adapter tensors this device trains, in the order the server sends them."""
    model_ref, quantization = trained_model(config, role)
    return list(adapter_state(lora_model(model_ref, LoraSpec.from_run_config(config), quantization, config.seed)))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peak_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else 0.0


def train(msg: Message, context: Context) -> Message:
    """Apply the global adapter, train it on local data, reply with the adapter and scalar metrics only."""
    config = RunConfig.from_mapping(context.run_config)
    use_node_model_cache(context)
    source, partition_id = local_data(context, config)
    round_config = msg.content[CONFIG_KEY]
    model_ref, quantization = trained_model(config, str(round_config.get("model", "small")))
    examples = _local_examples(source, partition_id, model_ref, config.max_length)
    model = lora_model(model_ref, LoraSpec.from_run_config(config), quantization, config.seed)
    tokenizer = load_tokenizer(model_ref)
    load_adapter_state(model, from_array_record(msg.content[ARRAYS_KEY]))
    server_round = int(round_config["server-round"])
    result = train_lora(model, examples, epochs=config.local_epochs, lr=float(round_config["lr"]),
                        batch_size=config.batch_size, pad_token_id=tokenizer.pad_token_id,
                        seed=config.seed * 100_003 + server_round * 1_009 + partition_id,
                        description=f"client {partition_id} round {server_round}")
    metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss,
                            "train-seconds": result.seconds, "model-loads": sum(LOAD_COUNTS.values()),
                            "peak-rss-mb": peak_rss_mb(), "cuda-peak-mb": cuda_peak_mb()})
    reply = RecordDict({ARRAYS_KEY: to_array_record(adapter_state(model), config.wire_dtype), METRICS_KEY: metrics})
    return Message(content=reply, reply_to=msg)
