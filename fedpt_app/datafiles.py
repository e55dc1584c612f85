"""Local data files (.jsonl, .json, .csv) read record by record, with errors that name the file and the line.

Both method families read their datasets and a device's own data file through `read_records`, then check each
record against their own schema; `seeded_sample` draws their evaluation rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def seeded_sample(rows: Sequence[T], size: int, seed: int) -> tuple[T, ...]:
    """`size` of the rows drawn with the seed, in their order; all of them when `size` is 0 or covers them."""
    if not size or size >= len(rows):
        return tuple(rows)
    return tuple(rows[index] for index in sorted(random.Random(seed).sample(range(len(rows)), size)))


def content_key(ref: str) -> str:
    """A dataset reference as a cache key: a local file by its content (another file at the same path, or the same
    file edited, is another dataset), a local folder by its files' names, sizes and modification times, anything
    else (a named or hub dataset) by name."""
    path = Path(ref).expanduser()
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    elif path.is_dir():
        for file in sorted(item for item in path.rglob("*") if item.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        return ref
    return f"sha256:{digest.hexdigest()}"


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file or dataset and, for a bad row, its line."""


def read_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, raw record) for each record, `where` being `file:line` (or `file item N` in a JSON list)."""
    if not path.is_file():
        raise DatasetError(f"Dataset file {str(path)!r} does not exist")
    reader = {".jsonl": _jsonl_records, ".json": _json_records, ".csv": _csv_records}.get(path.suffix)
    if reader is None:
        raise DatasetError(f"Data file {str(path)!r} must be .jsonl, .json or .csv")
    return reader(path)


def _jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path}:{line_number}: malformed JSON ({error.msg})") from error


def _json_records(path: Path) -> Iterator[tuple[str, object]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from error
    if not isinstance(records, list):
        raise DatasetError(f"{path}: expected a JSON list of objects")
    for index, record in enumerate(records):
        yield f"{path} item {index}", record


def _csv_records(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for record in reader:
            if None in record:  # more cells than header columns
                raise DatasetError(f"{path}:{reader.line_num}: more cells than the header has columns")
            yield f"{path}:{reader.line_num}", record
