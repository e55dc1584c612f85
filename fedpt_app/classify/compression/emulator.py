"""FedOT (Offsite-Tuning): bottom and top layers are the trainable adapter, the middle is layer-dropped to an
emulator; the adapter trained on the emulator is plugged back around the original middle layers."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedpt_app.classify.compression.ffn import transformer_blocks


@dataclass(frozen=True)
class EmulatorLayout:
    num_layers: int
    adapter_layers: int  # per side
    emulator_layers: int

    @classmethod
    def choose(cls, num_layers: int, adapter_layers: int = 0, emulator_layers: int = 0) -> EmulatorLayout:
        """0 picks automatically: the paper's 2 + 3 + 2 for models of 12+ layers; 1 per side and half the middle
        (rounded up) for shallower ones (MiniLM-L6: 1 + 2 + 1)."""
        adapter = adapter_layers or (2 if num_layers >= 12 else 1)
        middle = num_layers - 2 * adapter
        emulator = emulator_layers or (3 if num_layers >= 12 else -(-middle // 2))
        if middle < 1 or not 1 <= emulator <= middle:
            raise ValueError(
                f"FedOT needs 1 <= emulator layers <= middle layers: {num_layers} layers, {adapter} "
                f"adapter layers per side leave {middle} middle layers, asked for {emulator}"
            )
        return cls(num_layers, adapter, emulator)

    @property
    def middle(self) -> list[int]:
        return list(range(self.adapter_layers, self.num_layers - self.adapter_layers))

    @property
    def kept_middle(self) -> list[int]:
        """Uniform layer drop: emulator layers evenly spaced over the middle, first and last included."""
        middle, count = self.middle, self.emulator_layers
        if count == 1:
            return [middle[len(middle) // 2]]
        return [middle[round(i * (len(middle) - 1) / (count - 1))] for i in range(count)]

    @property
    def emulator_adapter_layers(self) -> list[int]:
        """Indices of the adapter layers inside the emulator model."""
        top_start = self.adapter_layers + self.emulator_layers
        return list(range(self.adapter_layers)) + list(range(top_start, top_start + self.adapter_layers))

    @property
    def full_adapter_layers(self) -> list[int]:
        return list(range(self.adapter_layers)) + list(range(self.num_layers - self.adapter_layers, self.num_layers))

    @property
    def distill_pair(self) -> tuple[int, int]:
        """(teacher, emulator) indices into `hidden_states` of the output of the middle part."""
        return self.num_layers - self.adapter_layers, self.adapter_layers + self.emulator_layers


def blocks_path(model: nn.Module) -> str:
    blocks = transformer_blocks(model)
    return next(name for name, module in model.named_modules() if module is blocks)


def build_emulator(model: nn.Module, layout: EmulatorLayout) -> nn.Module:
    """A copy of the model whose block stack is adapter (bottom) + kept middle layers + adapter (top)."""
    keep = (
        layout.full_adapter_layers[: layout.adapter_layers]
        + layout.kept_middle
        + layout.full_adapter_layers[layout.adapter_layers :]
    )
    return with_blocks(model, keep)


def with_blocks(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of the model with only the transformer blocks `keep`, in that order."""
    copied = copy.deepcopy(model)
    path = blocks_path(copied)
    blocks = copied.get_submodule(path)
    parent_name, _, child = path.rpartition(".")
    setattr(
        copied.get_submodule(parent_name) if parent_name else copied,
        child,
        nn.ModuleList([blocks[index] for index in keep]),
    )
    copied.config.num_hidden_layers = len(keep)
    for key in ("fedpt_ffn_modules", "layer_types"):  # per-block lists (FFN names found on the full model; a
        if getattr(copied.config, key, None):  # decoder's attention kinds): the kept blocks' entries
            setattr(copied.config, key, [getattr(copied.config, key)[index] for index in keep])
    for position, block in enumerate(copied.get_submodule(path)):
        for module in block.modules():  # decoders index their KV cache by layer_idx: renumber the kept blocks
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    return copied


def plug_into_full(state: dict[str, torch.Tensor], layout: EmulatorLayout, blocks_path: str) -> dict[str, torch.Tensor]:
    """Rename the adapter tensors of the emulator's top layers to the full model's layer indices."""
    mapping = dict(zip(layout.emulator_adapter_layers, layout.full_adapter_layers, strict=True))
    pattern = re.compile(rf"(^|\.){re.escape(blocks_path)}\.(\d+)\.")

    def renamed(key: str) -> str:
        return pattern.sub(lambda m: f"{m.group(1)}{blocks_path}.{mapping[int(m.group(2))]}.", key, count=1)

    return {renamed(key): tensor for key, tensor in state.items()}
