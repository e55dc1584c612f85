"""APoZ (average percentage of zeros) of FFN neurons, counted on a device's local data.

GELU-type activations are almost never exactly zero, so a neuron counts as zero on a token when its
pre-activation (the up projection's output, or the gate's for gated MLPs) is <= 0; for ReLU that is the same thing.
Padding tokens are not counted. Devices send counts and their token count; the server sums both before dividing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from torch import nn

from fedpt_app.classify.compression.ffn import find_ffns


@torch.no_grad()
def count_zero_activations(
    model: nn.Module, layers: Sequence[int], batches: Iterable[dict[str, torch.Tensor]]
) -> tuple[dict[int, torch.Tensor], int]:
    """({layer: per-neuron count of tokens with pre-activation <= 0}, number of real tokens); every position of
    an input without an attention mask (an image's patches) is real."""
    ffns = find_ffns(model)
    counts = {layer: torch.zeros(ffns[layer].width, dtype=torch.float64) for layer in layers}
    current_mask: list[torch.Tensor | None] = [None]
    tokens = 0

    def counter(layer: int):
        def hook(_module, _inputs, output):
            nonlocal tokens
            if current_mask[0] is None:  # the positions of this batch, learned from the first counted layer
                current_mask[0] = torch.ones(output.shape[:-1], dtype=torch.bool, device=output.device)
                tokens += int(current_mask[0].sum())
            zero = (output <= 0) & current_mask[0].unsqueeze(-1).bool()
            counts[layer] += zero.sum(dim=tuple(range(zero.dim() - 1))).double().cpu()

        return hook

    handles = [ffns[layer].activation_source.register_forward_hook(counter(layer)) for layer in layers]
    device = next(model.parameters()).device
    model.eval()
    try:
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items() if key != "labels"}
            current_mask[0] = batch.get("attention_mask")
            model(**batch)
            if "attention_mask" in batch:
                tokens += int(batch["attention_mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
    return counts, tokens


def neurons_to_update(zero_counts: dict[int, torch.Tensor], tokens: int, proportion: float) -> dict[int, torch.Tensor]:
    """Per layer, a boolean mask of the ceil(proportion * width) neurons with the highest APoZ (the least used
    locally, so the least disruptive to change); the rest stay frozen."""
    masks = {}
    for layer, counts in zero_counts.items():
        apoz = counts / max(tokens, 1)
        chosen = torch.topk(apoz, math.ceil(proportion * apoz.numel())).indices
        masks[layer] = torch.zeros(apoz.numel(), dtype=torch.bool).index_fill_(0, chosen, True)
    return masks


def apoz_record_problem(record: object, metrics: MetricRecord, widths: dict[str, int], max_length: int) -> str | None:
    """Zero counts per neuron: the expected layers and widths, integers in [0, tokens], and a token count no device
    could exceed: at most num-examples × max-length, the most positions of one example (padding is not counted)."""
    if not isinstance(record, ArrayRecord) or set(record) != set(widths) | {"tokens"}:
        return f"APoZ record must hold {sorted(widths)} and 'tokens'"
    tokens = record["tokens"].numpy()
    if tokens.shape != (1,) or not np.isfinite(tokens).all() or tokens[0] < 1 or tokens[0] != int(tokens[0]):
        return "APoZ 'tokens' must be one positive integer"
    if tokens[0] > metrics["num-examples"] * max_length:
        return f"APoZ 'tokens' {int(tokens[0])} exceeds num-examples × max-length"
    for key, width in widths.items():
        counts = record[key].numpy()
        if counts.shape != (width,):
            return f"APoZ {key} has shape {counts.shape}, expected ({width},)"
        if (
            not np.isfinite(counts).all()
            or (counts < 0).any()
            or (counts > tokens[0]).any()
            or (counts != np.round(counts)).any()
        ):
            return f"APoZ {key} must hold integer counts in [0, tokens]"
    return None
