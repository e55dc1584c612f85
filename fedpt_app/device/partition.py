"""Client partitions of a training split, with flwr-datasets partitioners (IID, Dirichlet, pathological).

A family gives its training rows (`training_rows(spec)`, the rows of `spec.dataset`'s train split); the partitioner
skews over the family's `column` (instruction categories, or class labels).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedpt_app.datafiles import DatasetError

if TYPE_CHECKING:
    from fedpt_app.config import DataConfig
    from fedpt_app.device.node import Node


@dataclass(frozen=True)
class PartitionSpec:
    dataset: str
    partitioner: str
    num_partitions: int
    column: str  # what the non-IID partitioners skew over: "category" (instructions) or "label" (classification)
    dirichlet_alpha: float = 1.0
    classes_per_partition: int = 3
    test_fraction: float = 0.1
    seed: int = 0

    def build_partitioner(self):
        from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

        if self.partitioner == "iid":
            return IidPartitioner(num_partitions=self.num_partitions)
        if self.partitioner == "dirichlet":
            return DirichletPartitioner(
                num_partitions=self.num_partitions,
                partition_by=self.column,
                alpha=self.dirichlet_alpha,
                min_partition_size=1,
                seed=self.seed,
            )
        if self.partitioner == "pathological":
            return PathologicalPartitioner(
                num_partitions=self.num_partitions,
                partition_by=self.column,
                num_classes_per_partition=self.classes_per_partition,
                class_assignment_mode="deterministic",
                seed=self.seed,
            )
        raise DatasetError(f"Unknown partitioner {self.partitioner!r}; choose iid, dirichlet or pathological")


TrainingRows = Callable[[PartitionSpec], Sequence[dict]]
ROW = "row"  # the partitioner's column of row indices


@functools.cache
def _partitioner(spec: PartitionSpec, training_rows: TrainingRows):
    """Built once per process: the Dirichlet draw and category assignment are then shared by all partitions. The
    partitioner sees the skew column and each row's index only (rows may hold images)."""
    from datasets import Dataset

    rows = training_rows(spec)
    partitioner = spec.build_partitioner()
    partitioner.dataset = Dataset.from_dict(
        {spec.column: [row[spec.column] for row in rows], ROW: list(range(len(rows)))}
    )
    return partitioner


def load_partition(spec: PartitionSpec, partition_id: int, training_rows: TrainingRows) -> list[dict]:
    """The training rows of one client; an empty or impossible partition is a clear error."""
    if not 0 <= partition_id < spec.num_partitions:
        raise DatasetError(f"partition-id {partition_id} is outside 0..{spec.num_partitions - 1}")
    empty = (
        f"Partition {partition_id} of {spec.num_partitions} ({spec.partitioner}) of {spec.dataset!r} is empty: "
        "use fewer partitions, more data or a larger dirichlet-alpha"
    )
    try:
        indices = _partitioner(spec, training_rows).load_partition(partition_id)[ROW]
    except (ValueError, IndexError) as error:  # flwr-datasets' ways of saying a partition gets no rows
        raise DatasetError(f"{empty} ({error})") from error
    if not indices:
        raise DatasetError(empty)
    rows = training_rows(spec)
    return [rows[index] for index in indices]


def node_source(node: Node, data: DataConfig, column: str, seed: int) -> PartitionSpec | str:
    """Where this node's training rows come from: its own data file, or its partition of the configured dataset."""
    if node.data_file is not None:
        return node.data_file
    return PartitionSpec(
        data.dataset,
        data.partitioner,
        node.num_partitions,
        column,
        data.dirichlet_alpha,
        data.classes_per_partition,
        data.test_fraction,
        seed,
    )


def source_rows(
    source: PartitionSpec | str,
    partition_id: int,
    read_file: Callable[[str], Sequence[dict]],
    training_rows: TrainingRows,
) -> Sequence[dict]:
    """The rows of a node's data file (read with the family's reader), or of its partition."""
    if isinstance(source, str):
        return read_file(source)
    return load_partition(source, partition_id, training_rows)
