"""Differential privacy of the aggregated adapter (DP-FedAvg with fixed clipping), on Flower's DP primitives.

`dp-mode='server'`: the server clips each client's update (client adapter minus the broadcast one) to L2 norm
`dp-clipping-norm`. `dp-mode='client'`: each device clips its own update with Flower's `fixedclipping_mod` before
sending (fedpt_app/device/mods.py), and the server only checks the norm. Either way the server then takes the
*uniform* mean of the clipped updates (per-client weights would make the sensitivity depend on `num-examples`) and
adds Gaussian noise of standard deviation `dp-noise-multiplier × dp-clipping-norm / n` (n = clients aggregated),
before any server step, so FedPT's distillation is post-processing of a private aggregate.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_clip_model_update, compute_stdv


def clipped(
    state: dict[str, torch.Tensor], broadcast: dict[str, torch.Tensor], clipping_norm: float
) -> OrderedDict[str, torch.Tensor]:
    """`broadcast + update · min(1, C / ‖update‖)`: the client's adapter with its update clipped to norm C."""
    client = [state[key].numpy().astype(np.float32) for key in broadcast]
    compute_clip_model_update(client, [value.numpy() for value in broadcast.values()], clipping_norm)
    return OrderedDict((key, torch.from_numpy(np.asarray(array))) for key, array in zip(broadcast, client, strict=True))


def noisy_mean(
    states: Sequence[dict[str, torch.Tensor]], clipping_norm: float, noise_multiplier: float
) -> tuple[OrderedDict[str, torch.Tensor], float]:
    """(uniform mean of the clipped states + Gaussian noise, the noise's standard deviation)."""
    stdv = compute_stdv(noise_multiplier, clipping_norm, len(states))
    keys = list(states[0])
    mean = [np.mean([state[key].numpy() for state in states], axis=0, dtype=np.float32) for key in keys]
    add_gaussian_noise_inplace(mean, stdv)
    return OrderedDict((key, torch.from_numpy(array)) for key, array in zip(keys, mean, strict=True)), stdv
