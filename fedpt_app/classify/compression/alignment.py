"""Distillation that aligns a compressed model with its full teacher on unlabeled inputs (texts or images).

- Layer-level (FedPFT before FL): per compressed layer, the normalized hidden-state error at the layer output plus
  `mu` times the normalized difference of the FFN products W1·W2, training the compressed FFNs and their norms.
- Neuron-level (FedPFT during FL): the same hidden-state loss (mu = 0), updating only chosen neurons.
- FedOT's emulator: the hidden state after the middle layers, training the emulator layers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fedpt_app.classify.compression.ffn import FFN, Conv1D


@dataclass(frozen=True)
class AlignmentResult:
    first_loss: float
    last_loss: float
    steps: int
    seconds: float


def normalized_hidden_error(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """mean over real tokens of mean(((hT - hS) / rms(hT))^2), rms over each token's hidden vector; without a mask
    (an image's patches) every position is real."""
    rms = teacher.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-6)
    per_token = ((teacher - student) / rms).pow(2).mean(dim=-1)
    weights = torch.ones_like(per_token) if mask is None else mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def ffn_product(ffn: FFN) -> torch.Tensor:
    """W1·W2 (hidden x hidden) of the up projection, in the orientation of its weights."""
    up, down = ffn.up.weight, ffn.down.weight
    return up @ down if isinstance(ffn.up, Conv1D) else down @ up


def product_regularizer(
    teacher_ffns: Sequence[FFN], student_ffns: Sequence[FFN], layers: Sequence[int]
) -> torch.Tensor:
    """sum over layers of ||W1·W2 - W1'·W2'||^2 / ||W1·W2||^2, differentiable in the student's weights."""
    total = torch.zeros((), device=student_ffns[layers[0]].up.weight.device)
    for layer in layers:
        with torch.no_grad():
            target = ffn_product(teacher_ffns[layer])
        total = total + (target - ffn_product(student_ffns[layer])).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
    return total


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return model(**inputs, output_hidden_states=True).hidden_states


def distill(
    teacher: nn.Module,
    student: nn.Module,
    parameters: Sequence[nn.Parameter],
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    pairs: Sequence[tuple[int, int]],
    steps: int,
    lr: float,
    regularizer=None,
    gradient_masks: dict[nn.Parameter, torch.Tensor] | None = None,
) -> AlignmentResult:
    """Train `parameters` of the student so its hidden states at `pairs` (teacher index, student index into
    `hidden_states`) match the teacher's; AdamW with a linear decay, no weight decay (a masked entry never moves).

    `regularizer()` adds a differentiable term; `gradient_masks` zero the gradient of frozen entries. Both models
    run in eval mode: dropout would add noise to the very hidden states being matched.
    """
    started = time.perf_counter()
    device = parameters[0].device
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(steps, 1))
    losses = []
    teacher.eval()
    student.eval()
    for _, batch in zip(range(steps), batches, strict=False):  # `batches` may be endless
        batch = {key: value.to(device) for key, value in batch.items()}
        with torch.no_grad():
            target = hidden_states(teacher, batch)
        output = hidden_states(student, batch)
        loss = sum(normalized_hidden_error(target[t], output[s], batch.get("attention_mask")) for t, s in pairs)
        if regularizer is not None:
            loss = loss + regularizer()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for parameter, mask in (gradient_masks or {}).items():
            parameter.grad.mul_(mask)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    if not losses:
        return AlignmentResult(float("nan"), float("nan"), 0, time.perf_counter() - started)
    return AlignmentResult(losses[0], losses[-1], len(losses), time.perf_counter() - started)


def ffn_parameters(ffn: FFN, with_norms: bool = True) -> list[nn.Parameter]:
    modules = [ffn.up, ffn.down] + ([ffn.gate] if ffn.gate_name else []) + (ffn.norm_modules() if with_norms else [])
    return [parameter for module in modules for parameter in module.parameters()]


def neuron_masks(ffn: FFN, update: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Gradient masks that let only the `update` neurons (a boolean vector over the FFN's neurons) change."""
    masks = {}
    for parameter, dim in ffn.neuron_parameters():
        shape = [1] * parameter.dim()
        shape[dim] = -1
        masks[parameter] = update.to(parameter.device, parameter.dtype).reshape(shape).expand_as(parameter).clone()
    return masks


@contextmanager
def only_trainable(model: nn.Module, parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """Exactly `parameters` are trainable inside the block; every flag is restored afterwards."""
    saved = {parameter: parameter.requires_grad for parameter in model.parameters()}
    model.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter, flag in saved.items():
            parameter.requires_grad_(flag)
