"""How a foundation model reads its inputs: text through its tokenizer, images through its image processor.

`model_inputs(model_ref)` picks by the model's config: a vision model (its config has `num_channels` and
`image_size`, as ViT, DeiT, BEiT and Swin have) reads images, any other model text. Both turn validated rows into
examples that `data.batches` stacks for training, evaluation, alignment and APoZ counting.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import AutoConfig, AutoImageProcessor, PretrainedConfig

from fedpt_app.datafiles import DatasetError
from fedpt_app.models.loading import ModelLoadError, load_tokenizer, resolve_model_ref


def is_vision_config(config: PretrainedConfig) -> bool:
    return hasattr(config, "num_channels") and hasattr(config, "image_size")


@dataclass(frozen=True)
class TextInputs:
    model_ref: str
    kind = "text"

    @property
    def pad_token_id(self) -> int:
        return load_tokenizer(self.model_ref).pad_token_id

    def encode(self, rows: Sequence[dict], max_length: int) -> list[dict]:
        """Token ids (and token type ids where the model has them) per row, truncated to max_length."""
        tokenizer = load_tokenizer(self.model_ref)
        texts, pairs = [row["text"] for row in rows], [row["text_pair"] for row in rows]
        encoded = tokenizer(texts, pairs if any(pairs) else None, truncation=True, max_length=max_length)
        keys = [key for key in ("input_ids", "token_type_ids") if key in encoded]
        return [
            {**{key: encoded[key][index] for key in keys}, "label": int(row["label"])} for index, row in enumerate(rows)
        ]

    def count_truncated(self, rows: Sequence[dict], max_length: int) -> int:
        """How many rows `encode` cuts at max_length."""
        texts, pairs = [row["text"] for row in rows], [row["text_pair"] for row in rows]
        encoded = load_tokenizer(self.model_ref)(texts, pairs if any(pairs) else None, truncation=False, verbose=False)
        return sum(len(ids) > max_length for ids in encoded["input_ids"])

    def tokens_per_example(self, max_length: int) -> int:
        """The most positions one example takes in the model (bounds a client's APoZ token count)."""
        return max_length


@dataclass(frozen=True)
class ImageInputs:
    model_ref: str
    kind = "image"
    pad_token_id = 0  # images are not padded

    def encode(self, rows: Sequence[dict], max_length: int) -> list[dict]:
        """Pixel values per row, resized and normalized by the model's image processor (max_length is for text)."""
        pixels = _image_processor(self.model_ref)(images=[row["image"] for row in rows], return_tensors="pt")
        return [
            {"pixel_values": pixels["pixel_values"][index], "label": int(row["label"])}
            for index, row in enumerate(rows)
        ]

    def count_truncated(self, rows: Sequence[dict], max_length: int) -> int:
        return 0

    def tokens_per_example(self, max_length: int) -> int:
        """Patches plus class (and distillation) tokens."""
        config = AutoConfig.from_pretrained(resolve_model_ref(self.model_ref))
        patch = getattr(config, "patch_size", 1)
        return (config.image_size // patch) ** 2 + 2


@functools.cache
def _image_processor(model_ref: str):
    source = resolve_model_ref(model_ref)
    try:
        return AutoImageProcessor.from_pretrained(source)
    except Exception as error:  # transformers raises several types for a missing processor
        raise ModelLoadError(
            f"Could not load the image processor of model {model_ref!r} ({source}): {error}"
        ) from error


@functools.cache
def model_inputs(model_ref: str) -> TextInputs | ImageInputs:
    source = resolve_model_ref(model_ref)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as error:
        raise ModelLoadError(
            f"Could not load the config of foundation model {model_ref!r} ({source}): {error}"
        ) from error
    return ImageInputs(model_ref) if is_vision_config(config) else TextInputs(model_ref)


def check_inputs_match(inputs: TextInputs | ImageInputs, dataset_kind: str, dataset: str) -> None:
    """A vision FM on text data (or a text FM on images) is an error before anything is built."""
    if inputs.kind != dataset_kind:
        raise DatasetError(
            f"foundation-model {inputs.model_ref!r} reads {inputs.kind}s but dataset {dataset!r} holds "
            f"{dataset_kind}s: use a {dataset_kind} foundation model or a {inputs.kind} dataset"
        )
