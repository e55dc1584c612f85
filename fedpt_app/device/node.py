"""This device as its node config describes it: who it is, which data it trains on and where it keeps its models.

The simulation engine sets `partition-id` and `num-partitions`; a SuperNode takes them, or a `data-file` of its own,
a `name` and a `model-cache` folder, from `--node-config`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Node:
    name: str | None = None  # the identity the server's client schedule samples (default: partition-K)
    data_file: str | None = None  # a .jsonl/.json/.csv on this device
    partition_id: int | None = None  # else: this partition of the configured dataset
    num_partitions: int | None = None
    model_cache: str | None = None  # where this device keeps (and builds) its models

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> Node:
        name = str(node_config["name"]) if "name" in node_config else None
        cache = str(node_config["model-cache"]) if "model-cache" in node_config else None
        if "data-file" in node_config:
            return cls(name=name, data_file=str(node_config["data-file"]), model_cache=cache)
        try:
            partition = int(node_config["partition-id"]), int(node_config["num-partitions"])
        except KeyError as error:
            raise ValueError(
                "This node has no 'partition-id'/'num-partitions' (nor a 'data-file') in its node "
                "config; start the SuperNode with --node-config 'partition-id=N num-partitions=K'"
            ) from error
        return cls(name=name, partition_id=partition[0], num_partitions=partition[1], model_cache=cache)

    @property
    def identity(self) -> str:
        """A name that stays the same across runs and restarts, unlike the node id Flower assigns."""
        if self.name:
            return self.name
        if self.partition_id is not None:
            return f"partition-{self.partition_id}"
        raise ValueError(
            f"This device trains on its own data file ({self.data_file}) and has no name: give it one in its node "
            'config, e.g. --node-config \'name="pi-kitchen" data-file="..."\''
        )

    @property
    def storage_key(self) -> str:
        """The folder name of this node's own files in a model cache (simulated nodes share one)."""
        key = self.name or (f"partition-{self.partition_id}" if self.partition_id is not None else "device")
        readable = re.sub(r"[^A-Za-z0-9_-]", "_", key)  # a name is not a path
        return readable if readable == key else f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"

    @property
    def index(self) -> int:
        """The number that tells this node's local randomness from its peers' (0 for a device's own data)."""
        return self.partition_id or 0

    def use_model_cache(self) -> None:
        """Point the model loader (FEDPT_CACHE) at this device's model cache, if it has one."""
        if self.model_cache is not None:
            os.environ["FEDPT_CACHE"] = self.model_cache


def local_seed(run_seed: int, server_round: int, node_index: int) -> int:
    """The seed of one node's shuffling in one round."""
    return run_seed * 100_003 + server_round * 1_009 + node_index
