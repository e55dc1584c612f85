"""Image classification data (FedPFT on vision foundation models) as rows {image, label}.

A dataset reference is `digits` (offline: the UCI handwritten digits, 1,797 8×8 images of 10 classes, as shipped in
the `scikit-learn` package), a local folder (an image folder with one sub-folder per label, or a folder of data
files) or a hub dataset id such as `uoft-cs/cifar10` for users with a network; folders and hub datasets are read
with `datasets`, which finds the image column and the labels (a `ClassLabel` column) itself.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fedpt_app.datafiles import DatasetError

DIGITS_LABELS = tuple(str(digit) for digit in range(10))
_LABEL_COLUMNS = ("label", "labels", "fine_label")
DATA_FILES = (".parquet", ".arrow", ".csv", ".json", ".jsonl")  # a folder of these is a dataset's files


def is_image_source(ref: str) -> bool:
    """Whether a dataset reference names images: `digits`, a folder, or a hub id that is not a text source."""
    if ref == "digits" or Path(ref).expanduser().is_dir():
        return True
    return "/" in ref and not ref.startswith("glue/") and Path(ref).suffix not in (".jsonl", ".csv", ".json")


def load_image_rows(ref: str) -> tuple[list[dict], list[dict] | None, tuple[str, ...]]:
    """(rows, the source's own test rows or None, label names)."""
    if ref == "digits":
        rows = _digits()
        return rows, None, DIGITS_LABELS
    dataset = _load(ref)
    train_split = "train" if "train" in dataset else next(iter(dataset))
    image_column, label_column, names = _columns(dataset[train_split], ref)

    def rows(split: str) -> list[dict]:
        """Labelled rows only: hub test splits often hide their labels as -1."""
        if label_column not in dataset[split].column_names:
            return []
        return [
            {"image": record[image_column].convert("RGB"), "label": int(record[label_column])}
            for record in dataset[split]
            if int(record[label_column]) >= 0
        ]

    held_out = (rows(split) for split in ("test", "validation") if split in dataset and split != train_split)
    return rows(train_split), next((split for split in held_out if split), None), names


def read_image_folder(path: str, label_names: Sequence[str], held_out: bool = False) -> list[dict]:
    """A local image folder (one sub-folder per label), its labels mapped by name onto the run's `label_names`;
    `held_out` (a test set) reads its test or validation split where it has one."""
    rows, test_rows, names = load_image_rows(path)
    rows = test_rows if held_out and test_rows else rows
    unknown = sorted(set(names) - set(label_names))
    if unknown:
        raise DatasetError(f"{path}: labels {unknown} are not among the run's labels {tuple(label_names)}")
    return [{**row, "label": list(label_names).index(names[row["label"]])} for row in rows]


def _digits() -> list[dict]:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "dataset 'digits' needs the scikit-learn package's data: "
            "pip install --no-deps scikit-learn==1.9.1 (scripts/setup.sh does)"
        )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    pixels = (table[:, :-1] * (255.0 / 16.0)).round().astype(np.uint8).reshape(-1, 8, 8)  # 17 grey levels
    return [
        {"image": Image.fromarray(image).convert("RGB"), "label": int(label)}
        for image, label in zip(pixels, table[:, -1], strict=True)
    ]


def _load(ref: str):
    from datasets import load_dataset

    folder = Path(ref).expanduser()
    try:
        if folder.is_dir() and not any(path.suffix in DATA_FILES for path in folder.rglob("*")):
            # an image folder: labels from the sub-folder names, even when a device holds one label only
            return load_dataset("imagefolder", data_dir=str(folder), drop_labels=False)
        return load_dataset(str(folder) if folder.is_dir() else ref)
    except Exception as error:  # datasets raises many types for a missing, unreachable or unreadable source
        raise DatasetError(
            f"Could not load image dataset {ref!r} (a local image folder with one sub-folder per label, or a hub "
            f"dataset id with a network): {error}"
        ) from error


def _columns(split, ref: str) -> tuple[str, str, tuple[str, ...]]:
    """The image column, the label column and its names (a ClassLabel)."""
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    features = split.features
    image = next((name for name, feature in features.items() if isinstance(feature, ImageFeature)), None)
    label = next((name for name in _LABEL_COLUMNS if isinstance(features.get(name), ClassLabel)), None)
    if image is None or label is None:
        raise DatasetError(
            f"{ref}: expected an image column and a class-label column ({', '.join(_LABEL_COLUMNS)}); "
            f"found {dict(features)}"
        )
    return image, label, tuple(features[label].names)
