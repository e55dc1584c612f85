"""The classify family's central evaluation: accuracy of a classifier on batches of labelled examples."""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Percent of examples whose argmax logit is the label."""
    device = next(model.parameters()).device
    model.eval()
    correct = total = 0
    for batch in batches:
        labels = batch.pop("labels").to(device)
        logits = model(**{key: value.to(device) for key, value in batch.items()}).logits
        correct += int((logits.argmax(dim=-1) == labels).sum())
        total += len(labels)
    return 100.0 * correct / total
