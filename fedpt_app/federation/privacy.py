"""Differential privacy of the aggregated adapter (DP-FedAvg with fixed clipping), on Flower's DP primitives.

`dp-mode='server'`: the server clips each client's update (client adapter minus the broadcast one) to L2 norm
`dp-clipping-norm`. `dp-mode='client'`: each device clips its own update with Flower's `fixedclipping_mod` before
sending (fedpt_app/device/mods.py), and the server only checks the norm. Either way the server then takes the
*uniform* mean of the clipped updates (per-client weights would make the sensitivity depend on `num-examples`) and
adds Gaussian noise of standard deviation `dp-noise-multiplier × dp-clipping-norm / n` (n = clients aggregated),
before any server step, so FedPT's distillation is post-processing of a private aggregate. `PrivacyBudget` reports
the ε spent after every round and enforces `dp-target-epsilon`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_clip_model_update, compute_stdv

from fedpt_app.config import ConfigError

if TYPE_CHECKING:
    from fedpt_app.config import PrivacyConfig


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


class PrivacyBudgetSpent(RuntimeError):
    """The next round would spend more than `dp-target-epsilon`: the run ends with the rounds it has."""


class PrivacyBudget:
    """The client-level (ε, δ) a DP-FedAvg run has spent, and the target it may not pass.

    One subsampled Gaussian mechanism per round: noise multiplier z = `dp-noise-multiplier` (the noise's std over the
    per-client sensitivity C of the sum), sampling rate q = sampled clients / connected clients, accounted with Opacus'
    RDP accountant. Opacus analyses Poisson sampling; the server samples a fixed number of clients per round, for
    which the bound is the usual approximation. `spent_rates` replays the rounds of a resumed run.
    """

    def __init__(self, privacy: PrivacyConfig, spent_rates: Sequence[float] = ()) -> None:
        from opacus.accountants import RDPAccountant

        self.noise_multiplier, self.delta, self.target = (
            privacy.dp_noise_multiplier,
            privacy.dp_delta,
            privacy.dp_target_epsilon,
        )
        self.accountant = RDPAccountant()
        for rate in spent_rates:
            self.spend(rate)

    def spend(self, sample_rate: float) -> float:
        """Account for one round; the ε spent so far."""
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=sample_rate)
        return self.accountant.get_epsilon(self.delta)

    def epsilon(self) -> float:
        """The ε spent so far (0 before the first round)."""
        return self.accountant.get_epsilon(self.delta) if self.accountant.history else 0.0

    def epsilon_after(self, sample_rate: float, rounds: int = 1) -> float:
        """The ε spent after `rounds` more rounds at this sampling rate (nothing is recorded)."""
        from opacus.accountants import RDPAccountant

        planned = RDPAccountant()
        planned.history = [*self.accountant.history, (self.noise_multiplier, sample_rate, rounds)]
        return planned.get_epsilon(self.delta)

    def check_plan(self, rounds: int, sample_rate: float) -> None:
        """Refuse a run whose planned rounds would pass the target (raises ConfigError)."""
        planned = self.epsilon_after(sample_rate, rounds)
        if self.target and planned > self.target:
            raise ConfigError(
                f"{rounds} rounds at sampling rate {sample_rate:g} with dp-noise-multiplier={self.noise_multiplier:g} "
                f"spend ε={planned:.3g} (δ={self.delta:g}) > dp-target-epsilon={self.target:g}: lower "
                "num-server-rounds or fraction-train, or raise the noise"
            )

    def check_round(self, number: int, sample_rate: float) -> None:
        """Stop before a round that would pass the target (raises PrivacyBudgetSpent)."""
        after = self.epsilon_after(sample_rate)
        if self.target and after > self.target:
            raise PrivacyBudgetSpent(
                f"Round {number} would bring ε to {after:.3g} > dp-target-epsilon={self.target:g} (δ={self.delta:g}): "
                f"the run ends with its first {number - 1} rounds"
            )
