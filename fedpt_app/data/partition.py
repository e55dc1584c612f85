"""Client partitions of the training split, with flwr-datasets partitioners (IID, Dirichlet, pathological)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner, Partitioner

from fedpt_app.data.sources import DatasetError, load_splits

# What the non-IID partitioners skew over: instruction categories, or class labels.
PARTITION_COLUMN = {"generation": "category", "classification": "label"}


def training_rows(spec: PartitionSpec) -> list[dict]:
    if spec.task == "classification":
        from fedpt_app.data.classification import load_classification_splits

        return list(load_classification_splits(spec.dataset, "", spec.test_fraction, spec.seed).train)
    return list(load_splits(spec.dataset, spec.test_fraction, spec.seed)["train"])


@dataclass(frozen=True)
class PartitionSpec:
    dataset: str
    partitioner: str
    num_partitions: int
    dirichlet_alpha: float = 1.0
    classes_per_partition: int = 3
    test_fraction: float = 0.1
    seed: int = 0
    task: str = "generation"

    def build_partitioner(self) -> Partitioner:
        if self.partitioner == "iid":
            return IidPartitioner(num_partitions=self.num_partitions)
        if self.partitioner == "dirichlet":
            return DirichletPartitioner(num_partitions=self.num_partitions, partition_by=PARTITION_COLUMN[self.task],
                                        alpha=self.dirichlet_alpha, min_partition_size=1, seed=self.seed)
        if self.partitioner == "pathological":
            return PathologicalPartitioner(num_partitions=self.num_partitions, partition_by=PARTITION_COLUMN[self.task],
                                           num_classes_per_partition=self.classes_per_partition,
                                           class_assignment_mode="deterministic", seed=self.seed)
        raise DatasetError(f"Unknown partitioner {self.partitioner!r}; choose iid, dirichlet or pathological")


@functools.cache
def _partitioner(spec: PartitionSpec) -> Partitioner:
    """Built once per process: the Dirichlet draw and category assignment are then shared by all partitions."""
    partitioner = spec.build_partitioner()
    partitioner.dataset = Dataset.from_list(training_rows(spec))
    return partitioner


def load_partition(spec: PartitionSpec, partition_id: int) -> list[dict[str, str]]:
    """The training rows of one client; an empty or impossible partition is a clear error."""
    if not 0 <= partition_id < spec.num_partitions:
        raise DatasetError(f"partition-id {partition_id} is outside 0..{spec.num_partitions - 1}")
    empty = (f"Partition {partition_id} of {spec.num_partitions} ({spec.partitioner}) of {spec.dataset!r} is empty: "
             "use fewer partitions, more data or a larger dirichlet-alpha")
    try:
        rows = _partitioner(spec).load_partition(partition_id).to_list()
    except (ValueError, IndexError) as error:  # flwr-datasets' ways of saying a partition gets no rows
        raise DatasetError(f"{empty} ({error})") from error
    if not rows:
        raise DatasetError(empty)
    return rows
