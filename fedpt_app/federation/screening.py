"""Screening of client replies before aggregation: a bad reply is dropped with a reason, the others aggregate.

A reply is usable only if it carries no error, exactly the adapter tensors the server sent (same keys, shapes, and
the configured wire dtype), finite values, the scalar metrics a ClientApp sends with a sane `num-examples`, the
records the algorithm asked for this round (each checked by the algorithm's own rule), and an update (client
adapter minus the broadcast one) whose L2 norm is within `max-update-norm`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedpt_app.protocol import ARRAYS_KEY, METRICS_KEY, ReplyMetrics

REPLY_METRICS = ReplyMetrics.record_keys()


class RoundFailedError(RuntimeError):
    """Fewer clients than `min-train-nodes` replied usefully: the run stops rather than use a bad model."""


@dataclass(frozen=True)
class Verdict:
    """Why a reply cannot be aggregated (None: it can), and its update norm once its tensors were checked."""

    problem: str | None = None
    update_norm: float | None = None


@dataclass(frozen=True)
class UpdateRules:
    """What a good reply looks like for one round."""

    broadcast: dict[str, torch.Tensor]  # the adapter the server sent this round (float32)
    wire_dtype: str
    max_update_norm: float  # 0: no bound
    max_num_examples: int
    # records an algorithm asked for this round besides adapter and metrics: name -> rule(record, the reply's
    # metrics) giving the record's problem or None
    extra_records: dict[str, Callable[[object, MetricRecord], str | None]] = field(default_factory=dict)


def check_reply(msg: Message, rules: UpdateRules) -> Verdict:
    """Whether this reply can be aggregated, and if its tensors were sound, the norm of its update."""
    if msg.has_error():
        return Verdict(f"client error: {msg.error.reason}")
    content = msg.content
    arrays, metrics = content.get(ARRAYS_KEY), content.get(METRICS_KEY)
    if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
        return Verdict(f"reply lacks the '{ARRAYS_KEY}' ArrayRecord or the '{METRICS_KEY}' MetricRecord")
    expected_records = {ARRAYS_KEY, METRICS_KEY} | set(rules.extra_records)
    if set(content) != expected_records:
        return Verdict(f"reply holds records {sorted(content)}, expected {sorted(expected_records)}")
    problem = (
        _metrics_problem(metrics, rules)
        or _arrays_problem(arrays, rules)
        or next(filter(None, (rule(content[name], metrics) for name, rule in rules.extra_records.items())), None)
    )
    if problem:
        return Verdict(problem)
    norm = update_norm(arrays, rules.broadcast)
    if rules.max_update_norm and norm > rules.max_update_norm:
        return Verdict(f"update norm {norm:.4g} exceeds max-update-norm {rules.max_update_norm:g}", norm)
    return Verdict(None, norm)


def _metrics_problem(metrics: MetricRecord, rules: UpdateRules) -> str | None:
    if set(metrics) != set(REPLY_METRICS):
        return f"metrics keys {sorted(metrics)}, expected {sorted(REPLY_METRICS)}"
    for key in REPLY_METRICS:
        value = metrics[key]
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric {key} is not a finite number: {value!r}"
    examples = metrics["num-examples"]
    if examples != int(examples) or not 1 <= examples <= rules.max_num_examples:
        return f"num-examples {examples} is not an integer in [1, {rules.max_num_examples}] (max-num-examples)"
    return None


def _arrays_problem(arrays: ArrayRecord, rules: UpdateRules) -> str | None:
    expected = rules.broadcast
    if set(arrays) != set(expected):
        missing, unexpected = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        return f"adapter keys differ: missing {missing[:2]}, unexpected {unexpected[:2]}"
    for key, array in arrays.items():
        if array.dtype != np.dtype(rules.wire_dtype).name:
            return f"{key} has dtype {array.dtype}, expected {rules.wire_dtype}"
        if tuple(array.shape) != tuple(expected[key].shape):
            return f"{key} has shape {tuple(array.shape)}, expected {tuple(expected[key].shape)}"
        if not np.isfinite(array.numpy()).all():
            return f"{key} holds NaN or infinite values"
    return None


def update_norm(arrays: ArrayRecord, broadcast: dict[str, torch.Tensor]) -> float:
    """L2 norm of (client adapter − broadcast adapter) over all tensors."""
    squared = sum(
        float((torch.from_numpy(array.numpy().astype(np.float32)) - broadcast[key]).double().pow(2).sum())
        for key, array in arrays.items()
    )
    return math.sqrt(squared)
