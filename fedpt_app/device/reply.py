"""A device's reply to a train message: the trained adapter in the wire dtype and the reply metrics, scalars only
(no example, prompt or gradient leaves the device)."""

from __future__ import annotations

import resource

import torch
from flwr.app import ArrayRecord, Message, RecordDict
from peft import PeftModel

from fedpt_app.device.training import TrainResult
from fedpt_app.models.loading import LOAD_COUNTS
from fedpt_app.models.lora import adapter_state, to_array_record
from fedpt_app.protocol import ARRAYS_KEY, METRICS_KEY, ReplyMetrics


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peak_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def train_reply(
    msg: Message,
    model: PeftModel,
    result: TrainResult,
    wire_dtype: str,
    rows_truncated: int,
    extra_records: dict[str, ArrayRecord] | None = None,
) -> Message:
    metrics = ReplyMetrics(
        result.num_examples,
        result.loss,
        result.seconds,
        sum(LOAD_COUNTS.values()),
        peak_rss_mb(),
        cuda_peak_mb(),
        rows_truncated,
    )
    content = RecordDict(
        {
            ARRAYS_KEY: to_array_record(adapter_state(model), wire_dtype),
            METRICS_KEY: metrics.to_record(),
            **(extra_records or {}),
        }
    )
    return Message(content=content, reply_to=msg)
