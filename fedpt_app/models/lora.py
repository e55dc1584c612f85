"""LoRA adapters with peft: attach once per process, move adapter tensors to and from Flower records."""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedpt_app.models.loading import load_causal_lm

if TYPE_CHECKING:
    from fedpt_app.config import LoraSettings


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: peft's per-architecture default

    @classmethod
    def from_settings(cls, settings: LoraSettings) -> LoraSpec:
        modules = settings.modules()
        return cls(settings.r, settings.alpha, settings.dropout, tuple(modules) if modules else None)

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules) if self.target_modules else None,
            task_type="CAUSAL_LM",
            bias="none",
        )


@functools.cache
def lora_model(model_ref: str, spec: LoraSpec, quantization: str = "none", seed: int = 0) -> PeftModel:
    """The base model with a LoRA adapter, built once per process and reused across rounds.

    peft injects the adapter into the base model in place, so one base carries one adapter spec: a second spec
    for the same model (tests, benches) gets its own uncached copy of the base.
    """
    base = load_causal_lm(model_ref, quantization)
    if isinstance(getattr(base, "peft_config", None), dict):
        base = load_causal_lm.__wrapped__(model_ref, quantization)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial A matrices: the same in every process for the same seed
        model = get_peft_model(base, spec.peft_config())
    return with_initial_state(model).eval()  # training code switches to train() and back


def with_initial_state(model: PeftModel) -> PeftModel:
    """Keep the freshly initialized adapter: the model is reused (cached) and later carries other states, while
    a run starts from this one."""
    model.initial_adapter_state = adapter_state(model)
    return model


def adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """The adapter's trainable tensors (float32, on CPU), keyed as peft saves them."""
    state = get_peft_model_state_dict(model)
    return OrderedDict((key, tensor.detach().to("cpu", torch.float32).clone()) for key, tensor in state.items())


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the adapter's tensors; every expected key must be present with its shape."""
    expected = get_peft_model_state_dict(model)
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"Adapter keys do not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"Adapter tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    set_peft_model_state_dict(model, state)


def to_array_record(state: dict[str, torch.Tensor], wire_dtype: str) -> ArrayRecord:
    """Serialize adapter tensors for the wire (float32 or float16: ArrayRecord has no bfloat16)."""
    dtype = np.dtype(wire_dtype)
    return ArrayRecord(
        {key: Array(tensor.detach().cpu().float().numpy().astype(dtype, copy=False)) for key, tensor in state.items()}
    )


def from_array_record(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """Adapter tensors from the wire, upcast to float32 for training and averaging."""
    return OrderedDict((key, torch.from_numpy(array.numpy().astype(np.float32))) for key, array in record.items())
