"""Instruction datasets from every source, as validated rows {instruction, context, response, category}.

A dataset reference is `builtin`, `world-facts` (geography questions from GeoNames: instruct/world_facts.py), a
local `.jsonl` / `.json` / `.csv` file, or anything `datasets.load_dataset` takes (a hub id such as
`databricks/databricks-dolly-15k`, or a local dataset folder). Aliases name the hub datasets of the FedPT paper.
Each source yields three disjoint splits: `train` (partitioned across clients), `server` (the server's own data,
e.g. for distillation) and `test` (held out for evaluation).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedpt_app.datafiles import DatasetError, read_records, seeded_sample
from fedpt_app.instruct.builtin import builtin_instruction_split
from fedpt_app.instruct.world_facts import NAME as WORLD_FACTS
from fedpt_app.instruct.world_facts import world_fact_rows

if TYPE_CHECKING:
    from fedpt_app.device.partition import PartitionSpec

HUB_ALIASES = {"dolly": "databricks/databricks-dolly-15k"}


@dataclass(frozen=True)
class HubSplit:
    path: str  # what `datasets.load_dataset` takes: a hub id or a local folder in the same layout
    config: str
    split: str


# The FedPT paper's held-out evaluation sets (`test-dataset`), used whole. Both ship in the Self-Instruct release
# (https://huggingface.co/datasets/yizhongw/self_instruct, Apache-2.0): "human_eval" holds the 252 user-oriented
# instructions written by people (first instance of each), "super_natural_instructions" / "test" the held-out
# test tasks of Super-NaturalInstructions (119 tasks, 11,810 rows).
EVALUATION_SETS = {
    "self-instruct": HubSplit("yizhongw/self_instruct", "human_eval", "train"),
    "super-ni": HubSplit("yizhongw/self_instruct", "super_natural_instructions", "test"),
}
# Column names that other instruction datasets use for our fields (first match wins).
COLUMN_ALIASES = {
    "instruction": ("instruction", "prompt", "definition"),
    "context": ("context", "input", "inputs"),
    "response": ("response", "output", "outputs", "targets", "completion"),
    "category": ("category", "task_name", "task", "motivation_app"),
}
SPLITS = ("train", "server", "test")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv")


def _first_text(value: object) -> str:
    """Some datasets hold lists of references; the first one is the reference we score against."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return value if isinstance(value, str) else ("" if value is None else str(value))


def normalize_row(raw: dict, where: str) -> dict[str, str]:
    """Map a raw record onto our four fields; `where` (file:line or dataset#index) names it in errors."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: expected an object with instruction/response fields, got {type(raw).__name__}")
    if isinstance(raw.get("instances"), dict):  # Self-Instruct's human evaluation set: its first instance
        raw = {
            **raw,
            "input": _first_text(raw["instances"].get("input")),
            "output": _first_text(raw["instances"].get("output")),
        }
    row = {}
    for field_name, candidates in COLUMN_ALIASES.items():
        present = next((name for name in candidates if name in raw), None)
        row[field_name] = _first_text(raw[present]).strip() if present else ""
    for required in ("instruction", "response"):
        if not row[required]:
            raise DatasetError(
                f"{where}: missing or empty {required!r} (accepted column names: {', '.join(COLUMN_ALIASES[required])})"
            )
    row["category"] = row["category"] or "general"
    return row


def _read_local_file(path: Path) -> list[dict[str, str]]:
    rows = [normalize_row(raw, where) for where, raw in read_records(path)]
    if not rows:
        raise DatasetError(f"Dataset file {str(path)!r} holds no rows")
    return rows


def read_rows_file(path: str) -> tuple[dict[str, str], ...]:
    """All rows of a local .jsonl/.json/.csv file (e.g. the data a device holds), validated like any dataset."""
    if Path(path).suffix not in (".jsonl", ".json", ".csv"):
        raise DatasetError(f"Data file {path!r} must be .jsonl, .json or .csv")
    return tuple(_read_local_file(Path(path)))


def _read_with_datasets(ref: str) -> list[dict[str, str]]:
    """A hub id or a local dataset folder, through `datasets.load_dataset` (its first split)."""
    import datasets

    source = HUB_ALIASES.get(ref, ref)
    try:
        loaded = datasets.load_dataset(source)
    except Exception as error:  # datasets raises many types for a missing or unreachable dataset
        raise DatasetError(f"Could not load dataset {ref!r} ({source}) with datasets.load_dataset: {error}") from error
    split = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
    return [normalize_row(raw, f"{source}#{index}") for index, raw in enumerate(split)]


def _split_rows(rows: list[dict[str, str]], test_fraction: float, seed: int) -> dict[str, list[dict[str, str]]]:
    """Deterministic disjoint split: test and server each get `test_fraction` of the rows."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out = max(1, int(len(rows) * test_fraction))
    if len(rows) < 2 * held_out + 1:
        raise DatasetError(f"Only {len(rows)} rows: too few to hold out test and server splits")
    shuffled = [rows[i] for i in order]
    return {"test": shuffled[:held_out], "server": shuffled[held_out : 2 * held_out], "train": shuffled[2 * held_out :]}


@functools.cache
def load_splits(ref: str, test_fraction: float = 0.1, seed: int = 0) -> dict[str, tuple[dict[str, str], ...]]:
    """All three splits of a dataset reference, cached per process."""
    if ref == "builtin":
        return {split: tuple(builtin_instruction_split(split, seed)) for split in SPLITS}
    path = Path(ref).expanduser()
    if ref == WORLD_FACTS:
        rows = list(world_fact_rows())
    elif path.suffix in LOCAL_SUFFIXES:
        rows = _read_local_file(path)
    elif ref.startswith(("/", ".", "~")) and not path.exists():
        raise DatasetError(f"Dataset path {ref!r} does not exist")
    else:
        rows = _read_with_datasets(ref)
    return {split: tuple(part) for split, part in _split_rows(rows, test_fraction, seed).items()}


def load_test_rows(
    dataset: str, test_dataset: str, test_fraction: float, seed: int, samples: int = 0
) -> tuple[dict[str, str], ...]:
    """The evaluation rows: the dataset's own test split, or a separate test set used whole (a paper's evaluation
    set, or all rows of another dataset); `samples` > 0 takes a seeded random sample of them, in their order."""
    if not test_dataset or test_dataset == "builtin":
        rows = load_splits(test_dataset or dataset, test_fraction, seed)["test"]
    elif test_dataset in EVALUATION_SETS:
        rows = _evaluation_set(test_dataset)
    else:
        splits = load_splits(test_dataset, test_fraction, seed)
        rows = tuple(row for split in SPLITS for row in splits[split])
    return seeded_sample(rows, samples, seed)


@functools.cache
def _evaluation_set(name: str) -> tuple[dict[str, str], ...]:
    import datasets

    source = EVALUATION_SETS[name]
    try:
        split = datasets.load_dataset(source.path, source.config, split=source.split)
    except Exception as error:  # datasets raises many types for a missing or unreachable dataset
        raise DatasetError(
            f"Could not load the evaluation set {name!r} ({source.path}, {source.config}, "
            f"{source.split}) with datasets.load_dataset: {error}"
        ) from error
    where = f"{source.path}/{source.config}/{source.split}"
    return tuple(normalize_row(raw, f"{where}#{index}") for index, raw in enumerate(split))


def categories(rows: Iterable[dict[str, str]]) -> list[str]:
    return sorted({row["category"] for row in rows})


def training_rows(spec: PartitionSpec) -> tuple[dict[str, str], ...]:
    """The train split that a partition spec divides among the clients."""
    return load_splits(spec.dataset, spec.test_fraction, spec.seed)["train"]
