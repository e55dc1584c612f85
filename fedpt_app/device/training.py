"""Local training on a device: AdamW over the trainable parameters (adapter, and a classifier's head)."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

Batches = Callable[..., Iterator[dict[str, torch.Tensor]]]  # (examples, batch_size, pad_token_id, generator)


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean over all optimizer steps of the round
    num_examples: int
    steps: int
    seconds: float


def train_lora(
    model: torch.nn.Module,
    examples: Sequence,
    make_batches: Batches,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    pad_token_id: int,
    seed: int,
    max_steps: int | None = None,
    description: str = "local training",
) -> TrainResult:
    """Train the model's trainable parameters (the adapter, and a classifier's head) in place, for `epochs` epochs
    or `max_steps` optimizer steps, whichever ends first; the family's batches carry their labels, so
    `model(**batch).loss` is the task's loss."""
    if not examples:
        raise ValueError("No training examples: every example was empty or cut off by max-length")
    device = next(model.parameters()).device
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    total = epochs * -(-len(examples) // batch_size)
    total = min(total, max_steps) if max_steps else total
    model.train()
    started, losses = time.perf_counter(), []
    with tqdm(total=total, desc=description, disable=not sys.stderr.isatty(), leave=False) as bar:
        epochs_of_batches = itertools.chain.from_iterable(
            make_batches(examples, batch_size, pad_token_id, generator) for _ in range(epochs)
        )
        for batch in itertools.islice(epochs_of_batches, total):
            loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            bar.update(1)
    model.eval()
    mean_loss = torch.stack(losses).mean().item()
    return TrainResult(mean_loss, len(examples), len(losses), time.perf_counter() - started)
