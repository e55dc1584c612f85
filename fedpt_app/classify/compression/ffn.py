"""Feed-forward blocks found by structure, their neuron saliency, and pruning to the most salient neurons.

FFN(x) = act(x·W1 + b1)·W2 + b2 (gated MLPs: act(x·Wg)·(x·W1)·W2). Neuron j is row j of W1 (and of the gate) and
column j of W2. The blocks are found by shape, not by attribute names: in each transformer block (the longest
ModuleList of identical blocks), the down projection maps d_ff -> hidden and the up (and gate) projections map
hidden -> d_ff. This covers BERT, RoBERTa, MPNet/MiniLM, ViT, GPT-2 (Conv1D) and Llama/Qwen (gated) alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

Projection = nn.Linear | Conv1D


class FFNNotFoundError(ValueError):
    """The model has no transformer blocks with a recognizable feed-forward network."""


def _in_out(module: Projection) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


@dataclass
class FFN:
    """One block's feed-forward network: its projections and where they sit (to replace them when pruning)."""

    layer: int
    block: nn.Module
    up_name: str
    down_name: str
    gate_name: str | None = None

    def _get(self, name: str | None) -> Projection | None:
        return None if name is None else self.block.get_submodule(name)

    @property
    def up(self) -> Projection:
        return self._get(self.up_name)

    @property
    def down(self) -> Projection:
        return self._get(self.down_name)

    @property
    def gate(self) -> Projection | None:
        return self._get(self.gate_name)

    @property
    def width(self) -> int:
        return _in_out(self.down)[0]

    @property
    def activation_source(self) -> Projection:
        """The projection whose output decides whether a neuron fires: the gate, or the up projection."""
        return self.gate if self.gate_name else self.up

    def replace(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.block.get_submodule(parent_name) if parent_name else self.block, child, module)

    def neuron_parameters(self) -> list[tuple[torch.Tensor, int]]:
        """(parameter, the dimension that indexes neurons) for every tensor that holds per-neuron values."""
        pairs = []
        for module in (self.up, self.gate):
            if module is None:
                continue
            pairs.append((module.weight, _output_dim(module)))
            if module.bias is not None:
                pairs.append((module.bias, 0))
        pairs.append((self.down.weight, 1 - _output_dim(self.down)))
        return pairs

    def norm_modules(self) -> list[nn.Module]:
        """LayerNorm/RMSNorm siblings of the down projection (post-LN encoders normalize the FFN output there)."""
        parent_name = self.down_name.rpartition(".")[0]
        if not parent_name:  # the down projection sits in the block itself: its norms belong to attention too
            return []
        return [
            module
            for module in self.block.get_submodule(parent_name).children()
            if "norm" in type(module).__name__.lower()
        ]


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The longest ModuleList whose children are all of one class: the model's stack of transformer blocks."""
    candidates = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(child) for child in module}) == 1
    ]
    if not candidates:
        raise FFNNotFoundError(f"{type(model).__name__} has no stack of transformer blocks")
    return max(candidates, key=len)


def hidden_size(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def _is_adapter(name: str) -> bool:
    """peft's LoRA matrices (lora_A, lora_B, ...) inside a wrapped projection are not the model's own."""
    return any(part.startswith("lora_") for part in name.split("."))


def _discover(model: nn.Module) -> list[list[str | None]]:
    """[up, gate, down] names per block, found by shape on an unpruned model (d_ff != hidden)."""
    hidden = hidden_size(model)
    names = []
    for layer, block in enumerate(transformer_blocks(model)):
        projections = {
            name: _in_out(module)
            for name, module in block.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and not _is_adapter(name)
        }
        downs = [name for name, (fan_in, fan_out) in projections.items() if fan_out == hidden and fan_in != hidden]
        if len(downs) != 1:
            raise FFNNotFoundError(
                f"Layer {layer} of {type(model).__name__}: expected one d_ff -> {hidden} "
                f"projection, found {downs or 'none'}"
            )
        width = projections[downs[0]][0]
        ups = [name for name, (fan_in, fan_out) in projections.items() if fan_in == hidden and fan_out == width]
        gates = [name for name in ups if "gate" in name.rsplit(".", 1)[-1]]
        rest = [name for name in ups if name not in gates]
        if len(rest) != 1 or len(gates) > 1:
            raise FFNNotFoundError(
                f"Layer {layer} of {type(model).__name__}: cannot tell the FFN's up projection among {ups or 'none'}"
            )
        names.append([rest[0], gates[0] if gates else None, downs[0]])
    return names


def find_ffns(model: nn.Module) -> list[FFN]:
    """Every block's FFN, in layer order. The module names found on the unpruned model are kept in its config
    (`fedpt_ffn_modules`, which travels with a model package): a pruned FFN may be exactly `hidden` wide, and
    shape alone could then not tell it from attention."""
    names = getattr(model.config, "fedpt_ffn_modules", None)
    if names is None:
        names = _discover(model)
        model.config.fedpt_ffn_modules = names
    blocks = transformer_blocks(model)
    return [
        FFN(layer, block, up_name=up, gate_name=gate, down_name=down)
        for layer, (block, (up, gate, down)) in enumerate(zip(blocks, names, strict=True))
    ]


def neuron_saliency(ffn: FFN) -> torch.Tensor:
    """saliency_j = sqrt(sum of squares of neuron j's W1 row (and gate row) and W2 column); biases ignored."""
    squares = torch.zeros(ffn.width, dtype=torch.float64)
    for parameter, dim in ffn.neuron_parameters():
        if parameter.dim() == 2:
            squares += parameter.detach().double().pow(2).sum(dim=1 - dim)
    return squares.sqrt()


def most_salient(ffn: FFN, keep: int) -> torch.Tensor:
    """Indices of the `keep` most salient neurons, in their original order."""
    return torch.sort(torch.topk(neuron_saliency(ffn), keep).indices).values


def _sliced(module: Projection, neurons: torch.Tensor, neuron_dim: int) -> Projection:
    weight = module.weight.detach().index_select(neuron_dim, neurons).clone()
    if isinstance(module, Conv1D):
        pruned = Conv1D(weight.shape[1], weight.shape[0])
    else:
        pruned = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
    pruned = pruned.to(device=weight.device, dtype=weight.dtype)
    pruned.weight.data.copy_(weight)
    if module.bias is not None:
        bias = module.bias.detach()
        pruned.bias.data.copy_(bias.index_select(0, neurons) if neuron_dim == _output_dim(module) else bias)
    pruned.weight.requires_grad_(module.weight.requires_grad)
    return pruned


def _output_dim(module: Projection) -> int:
    """The weight dimension of the outputs (the bias is per output)."""
    return 1 if isinstance(module, Conv1D) else 0


def keep_neurons(ffn: FFN, neurons: torch.Tensor) -> None:
    """Restrict the FFN to `neurons` (W1/gate rows and b1 entries, W2 columns); b2 and attention are untouched."""
    for name in (ffn.up_name, ffn.gate_name):
        if name is not None:
            module = ffn.block.get_submodule(name)
            ffn.replace(name, _sliced(module, neurons, _output_dim(module)))
    down = ffn.down
    ffn.replace(ffn.down_name, _sliced(down, neurons, 1 - _output_dim(down)))


def compress(model: nn.Module, layers: Sequence[int], compress_ratio: float) -> dict[int, torch.Tensor]:
    """Prune each listed layer's FFN to its top (1 - compress_ratio) neurons, in place; returns the kept indices."""
    kept = {}
    ffns = find_ffns(model)
    for layer in layers:
        ffn = ffns[layer]
        neurons = most_salient(ffn, max(1, round(ffn.width * (1.0 - compress_ratio))))
        keep_neurons(ffn, neurons)
        kept[layer] = neurons
    return kept


def ffn_widths(model: nn.Module) -> list[int]:
    return [ffn.width for ffn in find_ffns(model)]


def resize_ffns(model: nn.Module, widths: Sequence[int]) -> None:
    """Give each FFN the width of a pruned model (its first neurons), so that model's state dict loads into it."""
    for ffn, width in zip(find_ffns(model), widths, strict=True):
        if ffn.width != width:
            keep_neurons(ffn, torch.arange(width))
