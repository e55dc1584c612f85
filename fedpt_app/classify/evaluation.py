"""The classify family's central evaluation: accuracy of a sequence classifier on encoded examples."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedpt_app.classify.data import batches


@torch.no_grad()
def accuracy(model: torch.nn.Module, examples: Sequence[dict], *, batch_size: int, pad_token_id: int) -> float:
    """Percent of encoded examples whose argmax logit is the label."""
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for batch in batches(examples, batch_size, pad_token_id):
        labels = batch.pop("labels").to(device)
        logits = model(**{key: value.to(device) for key, value in batch.items()}).logits
        correct += int((logits.argmax(dim=-1) == labels).sum())
    return 100.0 * correct / len(examples)
