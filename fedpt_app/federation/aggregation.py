"""Aggregation of LoRA adapters across clients."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch


def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> OrderedDict[str, torch.Tensor]:
    """Weighted average of each tensor, in float32; LoRA A and B are averaged separately (the standard FedAvg).

    Every state must hold the same keys and shapes; weights are usually the clients' `num-examples`.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"Need one weight per state, got {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"Weights must sum to a positive number, got {list(weights)}")
    averaged = OrderedDict()
    for key in states[0]:
        averaged[key] = sum(
            state[key].float() * (weight / total) for state, weight in zip(states, weights, strict=True)
        )
    return averaged
