"""The logits protocol's wire format, shared by the service and its clients (`fedpt-logits/1`, docs/serving.md).

Log-probabilities travel as base64 of little-endian arrays inside JSON: dense `[rows, vocab]` (float32 or
float16), or top-k as `indices` (int32) and `values` `[rows, k]` plus each row's `tail` (the log of the
probability mass outside its top-k), so a client can spread that mass over the tokens it was not sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math

import numpy as np
import torch

PROTOCOL = "fedpt-logits/1"
DTYPES = {"float32": np.float32, "float16": np.float16}
TAIL_MODES = ("drop", "uniform")


def vocabulary_sha256(tokenizer) -> str:
    """Fingerprint of a tokenizer's token-to-id map: equal fingerprints mean the ids mean the same tokens."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def encode_array(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()).decode()


def decode_array(data: str, dtype: str, shape: list[int]) -> np.ndarray:
    array = np.frombuffer(base64.b64decode(data), dtype=np.dtype(dtype).newbyteorder("<"))
    if array.size != math.prod(shape):
        raise ValueError(f"payload holds {array.size} values, shape {shape} needs {math.prod(shape)}")
    return array.reshape(shape)


def encode_logprobs(logprobs: torch.Tensor, top_k: int, dtype: str) -> dict:
    """Rows of log-probabilities [..., V] (float32), dense or as their top-k with the tail mass."""
    shape = list(logprobs.shape)
    if not top_k or top_k >= shape[-1]:
        return {"format": "dense", "shape": shape, "dtype": dtype, "data": encode_array(logprobs.numpy().astype(dtype))}
    values, indices = logprobs.topk(top_k, dim=-1)
    tail = tail_log_mass(values)
    return {
        "format": "top_k",
        "shape": shape[:-1] + [top_k],
        "vocab_size": shape[-1],
        "dtype": dtype,
        "indices": encode_array(indices.numpy().astype(np.int32)),
        "values": encode_array(values.numpy().astype(dtype)),
        "tail": encode_array(tail.numpy().astype(np.float32)),
    }


def decode_logprobs(payload: dict, tail_mode: str = "drop") -> torch.Tensor:
    """Dense float32 log-probabilities from `encode_logprobs`' payload. A top-k payload's other tokens get -inf
    (`drop`: the distribution renormalised over the top-k) or an equal share of the tail mass (`uniform`)."""
    shape = payload["shape"]
    if payload["format"] == "dense":
        return torch.from_numpy(decode_array(payload["data"], payload["dtype"], shape).astype(np.float32))
    indices = torch.from_numpy(decode_array(payload["indices"], "int32", shape).astype(np.int64))
    values = torch.from_numpy(decode_array(payload["values"], payload["dtype"], shape).astype(np.float32))
    tail = torch.from_numpy(decode_array(payload["tail"], "float32", shape[:-1]).copy())
    return dense_from_top_k(indices, values, tail, payload["vocab_size"], tail_mode)


def tail_log_mass(top_values: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ p) of the probability outside each row's top-k log-probabilities (never exactly -inf)."""
    return torch.log1p(-top_values.exp().sum(-1).clamp(max=1.0 - 1e-7))


def approximate_top_k(logprobs: torch.Tensor, top_k: int, tail_mode: str) -> torch.Tensor:
    """What a client that only got each row's top-k log-probabilities knows: those k, the rest filled as
    `dense_from_top_k` does (0: the rows unchanged). Applied to rows already filled so, it changes nothing."""
    if not top_k or top_k >= logprobs.shape[-1]:
        return logprobs
    values, indices = logprobs.topk(top_k, dim=-1)
    return dense_from_top_k(indices, values, tail_log_mass(values), logprobs.shape[-1], tail_mode)


def dense_from_top_k(
    indices: torch.Tensor, values: torch.Tensor, tail: torch.Tensor, vocab_size: int, tail_mode: str
) -> torch.Tensor:
    """[..., k] top-k log-probabilities scattered into [..., V]; the rest -inf or `tail - log(V - k)` each."""
    if tail_mode not in TAIL_MODES:
        raise ValueError(f"tail mode {tail_mode!r}: choose one of {', '.join(TAIL_MODES)}")
    fill = torch.full(values.shape[:-1] + (vocab_size,), -math.inf)
    if tail_mode == "uniform" and vocab_size > values.shape[-1]:
        fill = fill.copy_((tail - math.log(vocab_size - values.shape[-1])).unsqueeze(-1).expand_as(fill))
    return fill.scatter(-1, indices, values)
