"""Instruction datasets from every source, as validated rows {instruction, context, response, category}.

A dataset reference is `builtin`, a local `.jsonl` / `.json` / `.csv` file, or anything `datasets.load_dataset`
takes (a hub id such as `databricks/databricks-dolly-15k`, or a local dataset folder). Aliases name the hub
datasets of the FedPT paper. Each source yields three disjoint splits: `train` (partitioned across clients),
`server` (the server's own data, e.g. for distillation) and `test` (held out for evaluation).
"""

from __future__ import annotations

import csv
import functools
import json
import random
from collections.abc import Iterable
from pathlib import Path

from fedpt_app.data.builtin import builtin_instruction_split

HUB_ALIASES = {
    "dolly": "databricks/databricks-dolly-15k",
    "self-instruct": "yizhongw/self_instruct",
    "super-ni": "Muennighoff/natural-instructions",
}
# Column names that other instruction datasets use for our fields (first match wins).
COLUMN_ALIASES = {
    "instruction": ("instruction", "prompt", "definition"),
    "context": ("context", "input", "inputs"),
    "response": ("response", "output", "outputs", "targets", "completion"),
    "category": ("category", "task_name", "task"),
}
SPLITS = ("train", "server", "test")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv")


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file or dataset and, for a bad row, its line."""


def _first_text(value: object) -> str:
    """Some datasets hold lists of references; the first one is the reference we score against."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return value if isinstance(value, str) else ("" if value is None else str(value))


def normalize_row(raw: dict, where: str) -> dict[str, str]:
    """Map a raw record onto our four fields; `where` (file:line or dataset#index) names it in errors."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: expected an object with instruction/response fields, got {type(raw).__name__}")
    row = {}
    for field_name, candidates in COLUMN_ALIASES.items():
        present = next((name for name in candidates if name in raw), None)
        row[field_name] = _first_text(raw[present]).strip() if present else ""
    for required in ("instruction", "response"):
        if not row[required]:
            raise DatasetError(f"{where}: missing or empty {required!r} "
                               f"(accepted column names: {', '.join(COLUMN_ALIASES[required])})")
    row["category"] = row["category"] or "general"
    return row


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path}:{line_number}: malformed JSON ({error.msg})") from error
            rows.append(normalize_row(raw, f"{path}:{line_number}"))
    return rows


def _read_json(path: Path) -> list[dict[str, str]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from error
    if not isinstance(records, list):
        raise DatasetError(f"{path}: expected a JSON list of objects")
    return [normalize_row(raw, f"{path} item {index}") for index, raw in enumerate(records)]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = []
        for raw in reader:
            if None in raw:  # more cells than header columns
                raise DatasetError(f"{path}:{reader.line_num}: more cells than the header has columns")
            rows.append(normalize_row(raw, f"{path}:{reader.line_num}"))
    return rows


def _read_local_file(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"Dataset file {str(path)!r} does not exist")
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[path.suffix]
    rows = reader(path)
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
    return {"test": shuffled[:held_out], "server": shuffled[held_out:2 * held_out], "train": shuffled[2 * held_out:]}


@functools.cache
def load_splits(ref: str, test_fraction: float = 0.1, seed: int = 0) -> dict[str, tuple[dict[str, str], ...]]:
    """All three splits of a dataset reference, cached per process."""
    if ref == "builtin":
        return {split: tuple(builtin_instruction_split(split, seed)) for split in SPLITS}
    path = Path(ref).expanduser()
    if path.suffix in LOCAL_SUFFIXES:
        rows = _read_local_file(path)
    elif ref.startswith(("/", ".", "~")) and not path.exists():
        raise DatasetError(f"Dataset path {ref!r} does not exist")
    else:
        rows = _read_with_datasets(ref)
    return {split: tuple(part) for split, part in _split_rows(rows, test_fraction, seed).items()}


def load_test_rows(dataset: str, test_dataset: str, test_fraction: float, seed: int) -> tuple[dict[str, str], ...]:
    """The evaluation rows: the dataset's own test split, or all rows of a separate test dataset."""
    if not test_dataset:
        return load_splits(dataset, test_fraction, seed)["test"]
    splits = load_splits(test_dataset, test_fraction, seed)
    if test_dataset == "builtin":
        return splits["test"]
    return tuple(row for split in SPLITS for row in splits[split])


def categories(rows: Iterable[dict[str, str]]) -> list[str]:
    return sorted({row["category"] for row in rows})
