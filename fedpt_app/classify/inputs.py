"""How a foundation model reads its inputs: text through its tokenizer, images through its image processor.

`model_inputs(model_ref)` picks by the model's config: a model type transformers classifies images with (ViT, DeiT,
BEiT, Swin, ...) reads images, any other model text. Both turn validated rows into examples, and examples into
batches for training, evaluation, alignment and APoZ counting: token ids are encoded once and padded per batch;
images stay images until their batch is processed (the pixel values of a whole dataset would take gigabytes).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoImageProcessor, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from fedpt_app.classify.data import batches
from fedpt_app.datafiles import DatasetError
from fedpt_app.models.loading import ModelLoadError, load_tokenizer, resolve_model_ref


def is_vision_config(config: PretrainedConfig) -> bool:
    """A model transformers classifies images with (ViT, DeiT, BEiT, Swin, ConvNeXt, ...)."""
    return config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


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

    def batches(
        self, examples: Sequence[dict], batch_size: int, pad_token_id: int | None = None, generator=None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Right-padded batches (the signature of `training.Batches`; the padding id is the tokenizer's)."""
        return batches(examples, batch_size, self.pad_token_id, generator)


@dataclass(frozen=True)
class ImageInputs:
    model_ref: str
    kind = "image"
    pad_token_id = 0  # images are not padded

    def encode(self, rows: Sequence[dict], max_length: int) -> list[dict]:
        """The images themselves (max_length is for text): the processor runs per batch."""
        return [{"image": row["image"], "label": int(row["label"])} for row in rows]

    def batches(
        self, examples: Sequence[dict], batch_size: int, pad_token_id: int | None = None, generator=None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of pixel values, resized and normalized by the model's image processor."""
        return batches(examples, batch_size, 0, generator, collate_batch=self.pixels)

    def pixels(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        processed = _image_processor(self.model_ref)(
            images=[example["image"] for example in examples], return_tensors="pt"
        )
        labels = torch.tensor([example["label"] for example in examples], dtype=torch.long)
        return {"pixel_values": processed["pixel_values"], "labels": labels}

    def count_truncated(self, rows: Sequence[dict], max_length: int) -> int:
        return 0

    def tokens_per_example(self, max_length: int) -> int:
        """Patches plus class (and distillation) tokens: (image size / patch size) per side, squared, plus 2; a
        model without patches (a CNN) counts its input pixels."""
        config = AutoConfig.from_pretrained(resolve_model_ref(self.model_ref))
        size, patch = _pair(getattr(config, "image_size", 224)), _pair(getattr(config, "patch_size", 1))
        return math.prod(side // step for side, step in zip(size, patch, strict=True)) + 2


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
