"""FedPT's server step: distil the proxy-tuned large model into the small model's adapter.

Teacher at every response position: `z~ = zL + alpha * (zs(theta_s + A_bar) - zs(theta_s))`. Its round-invariant
part `zL - alpha * zs(theta_s)` is computed once for the distillation set and cached (exact, float16, in memory
or in a memory-mapped file); a round then pays one no-grad forward of the small model with A_bar per batch plus
the student's forward/backward. Where the cache would not fit its budget, the teacher is recomputed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flwr.common.logger import log
from peft import PeftModel

from fedpt_app.instruct.decoding import positions_of
from fedpt_app.instruct.prompts import IGNORE_INDEX, TokenizedExample, collate
from fedpt_app.instruct.proxy import LogitsProvider, refuse_embedding_lora, small_offset
from fedpt_app.models.lora import adapter_state, load_adapter_state


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T^2 * KL(softmax(teacher/T) || softmax(student/T))`, averaged over the rows (response positions).

    torch's `kl_div` takes the teacher as probabilities and computes `p·log p` with `xlogy`, so a token the teacher
    rules out (logit -inf, probability 0) adds 0 instead of NaN. Computed in float32, or float64 for float64 logits."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    teacher = F.softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return temperature**2 * F.kl_div(student, teacher, reduction="batchmean")


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """Mask [B, T] of the positions whose next-token logits predict a response token (labels shifted by one)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def response_count(example: TokenizedExample) -> int:
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


@dataclass(frozen=True)
class DistillConfig:
    alpha: float
    temperature: float
    steps: int
    lr: float
    batch_size: int
    seed: int
    teacher_top_k: int = 0  # 0: the full distribution; k: the large model's k largest logits (the rest ruled out)


def _forward_at_responses(logits_fn, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rows of logits at the batch's response positions (in row-major order), from right-padded inputs."""
    mask = response_positions(batch["labels"])
    logits = logits_fn(batch["input_ids"], batch["attention_mask"], positions_of(batch["attention_mask"]))
    return logits[mask.to(logits.device)]


def _large_at_responses(large: LogitsProvider, batch: dict[str, torch.Tensor], top_k: int = 0) -> torch.Tensor:
    mask = response_positions(batch["labels"])
    inputs = (batch["input_ids"], batch["attention_mask"], positions_of(batch["attention_mask"]))
    return large.logits_at(*inputs, mask, top_k=top_k)


def top_k_only(rows: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each row's `top_k` largest logits, every other one -inf (a top-k teacher: its distribution renormalised
    over those k tokens, the tail dropped)."""
    if not top_k or top_k >= rows.shape[-1]:
        return rows
    values, indices = rows.topk(top_k, dim=-1)
    return torch.full_like(rows, -torch.inf).scatter(-1, indices, values)


class TeacherCache:
    """`zL - alpha * zs_base` at every response position of the distillation set, computed once.

    Stored as one float16 matrix [positions, vocab] (a tensor, or a `np.memmap` file for mode "disk") with
    per-example row offsets. With `top_k`, only the large model's k largest logits of each position are kept:
    their token ids (int32) and values [positions, k]; the other tokens get -inf. `rows(indices)` returns the
    dense rows of those examples in `collate` order.
    """

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        large: LogitsProvider,
        small: PeftModel,
        alpha: float,
        pad_token_id: int,
        mode: str,
        budget_mb: float,
        directory: Path,
        batch_size: int = 16,
        top_k: int = 0,
    ) -> None:
        counts = [response_count(example) for example in examples]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.vocab_size = large.vocab_size
        self.top_k = top_k if 0 < top_k < self.vocab_size else 0
        width = self.top_k or self.vocab_size
        self.nbytes = int(self.offsets[-1]) * width * (6 if self.top_k else 2)  # float16 values (+ int32 ids)
        self.mode = mode if self.nbytes <= budget_mb * 2**20 else "off"
        if mode != "off" and self.mode == "off":
            log(
                WARNING,
                "[fedpt-app] teacher cache needs %.0f MB > teacher-cache-mb=%g: recomputing the teacher "
                "every round instead",
                self.nbytes / 2**20,
                budget_mb,
            )
        self.storage: np.ndarray | None = None  # the values: float16 [positions, k or vocab]
        self.token_ids: np.ndarray | None = None  # with top_k: int32 [positions, k]
        if self.mode == "off":
            return
        started = time.perf_counter()
        shape = (int(self.offsets[-1]), width)
        self.storage = self._array(directory, "teacher-cache.npy", shape, np.float16)
        if self.top_k:
            self.token_ids = self._array(directory, "teacher-cache-ids.npy", shape, np.int32)
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_token_id)
            rows = self._invariant_part(large, small, alpha, batch, self.top_k).cpu()
            first, last = self.offsets[start], self.offsets[min(start + batch_size, len(examples))]
            if self.top_k:
                values, token_ids = rows.topk(self.top_k, dim=-1)
                self.storage[first:last], self.token_ids[first:last] = values.numpy(), token_ids.numpy()
            else:
                self.storage[first:last] = rows.numpy()
        for array in (self.storage, self.token_ids):
            if isinstance(array, np.memmap):
                array.flush()
        log(
            INFO,
            "[fedpt-app] teacher cache: %d positions x %d logits%s, %.1f MB (%s), built in %.1f s",
            shape[0],
            shape[1],
            " (top-k)" if self.top_k else "",
            self.nbytes / 2**20,
            self.mode,
            time.perf_counter() - started,
        )

    def _array(self, directory: Path, name: str, shape: tuple[int, int], dtype) -> np.ndarray:
        if self.mode != "disk":
            return np.empty(shape, dtype=dtype)
        directory.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(directory / name, mode="w+", dtype=dtype, shape=shape)

    @staticmethod
    def _invariant_part(
        large: LogitsProvider, small: PeftModel, alpha: float, batch: dict[str, torch.Tensor], top_k: int
    ) -> torch.Tensor:
        """`zL - alpha * zs_base` in float32; with `top_k`, -inf outside the large model's top-k."""
        large_rows = top_k_only(_large_at_responses(large, batch, top_k), top_k)
        with small.disable_adapter():
            base_rows = _forward_at_responses(lambda *a: _no_grad_logits(small, *a), batch)
        return large_rows - alpha * base_rows[:, : large.vocab_size].to(large_rows.device)

    @property
    def enabled(self) -> bool:
        return self.storage is not None

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        def gathered(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([array[self.offsets[i] : self.offsets[i + 1]] for i in indices]))

        values = gathered(self.storage).float()
        if not self.top_k:
            return values
        dense = torch.full((values.shape[0], self.vocab_size), -torch.inf)
        return dense.scatter(-1, gathered(self.token_ids).long(), values)


def _no_grad_logits(model: torch.nn.Module, input_ids, attention_mask, position_ids) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
        ).logits.float()


class AdapterSlots:
    """The adapter's trainable tensors in place, to run the model with another adapter for a moment (the round's
    frozen teacher adapter) by copying values in and back: no state-dict round trip per step."""

    def __init__(self, model: PeftModel) -> None:
        self.parameters = [p for p in model.parameters() if p.requires_grad]

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters]

    @contextmanager
    def holding(self, values: Sequence[torch.Tensor]) -> Iterator[None]:
        saved = self.snapshot()
        with torch.no_grad():
            for parameter, value in zip(self.parameters, values, strict=True):
                parameter.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, saved, strict=True):
                    parameter.copy_(value)


@dataclass(frozen=True)
class DistillResult:
    state: OrderedDict[str, torch.Tensor]
    loss: float  # mean KD loss over the round's steps
    seconds: float


class ProxyDistiller:
    """Distils the proxy-tuned large model into the small model's adapter, `steps` AdamW steps per round."""

    def __init__(
        self,
        small: PeftModel,
        large: LogitsProvider,
        examples: Sequence[TokenizedExample],
        config: DistillConfig,
        pad_token_id: int,
        cache_mode: str,
        cache_budget_mb: float,
        cache_dir: Path,
    ) -> None:
        if not examples:
            raise ValueError("The distillation set is empty: the server split has no rows")
        refuse_embedding_lora(small)
        self.small, self.large, self.examples, self.config = small, large, list(examples), config
        self.pad_token_id = pad_token_id
        self.small.eval()
        self.cache = TeacherCache(
            self.examples,
            large,
            small,
            config.alpha,
            pad_token_id,
            cache_mode,
            cache_budget_mb,
            cache_dir,
            top_k=config.teacher_top_k,
        )

    def batch_indices(self, server_round: int) -> list[list[int]]:
        """The round's `steps` batches: a fresh shuffle per round, cycling through the distillation set."""
        generator = torch.Generator().manual_seed(self.config.seed * 7_919 + server_round)
        order: list[int] = []
        while len(order) < self.config.steps * self.config.batch_size:
            order += torch.randperm(len(self.examples), generator=generator).tolist()
        size = self.config.batch_size
        return [order[step * size : (step + 1) * size] for step in range(self.config.steps)]

    def teacher(self, indices: Sequence[int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher logits at the response positions of examples `indices` (collated as `batch`), with the small
        model's adapter as it is now (the caller holds the round's frozen teacher adapter in place)."""
        vocab = self.large.vocab_size
        if self.cache.enabled:
            tuned = _forward_at_responses(lambda *a: _no_grad_logits(self.small, *a), batch)[:, :vocab]
            return self.cache.rows(indices).to(tuned.device) + self.config.alpha * tuned
        large_rows = top_k_only(
            _large_at_responses(self.large, batch, self.config.teacher_top_k), self.config.teacher_top_k
        )
        offset = _forward_at_responses(lambda *a: small_offset(self.small, vocab, *a)[0], batch)
        return large_rows + self.config.alpha * offset.to(large_rows.device)

    def run_round(self, server_round: int, start_state: OrderedDict[str, torch.Tensor]) -> DistillResult:
        """Start from the aggregated adapter, take `steps` KD steps, return the new adapter."""
        started = time.perf_counter()
        load_adapter_state(self.small, start_state)
        slots = AdapterSlots(self.small)
        teacher_adapter = slots.snapshot()
        optimizer = torch.optim.AdamW(slots.parameters, lr=self.config.lr, weight_decay=0.0)
        device = slots.parameters[0].device
        losses = []
        for indices in self.batch_indices(server_round):
            batch = collate([self.examples[i] for i in indices], self.pad_token_id)
            with slots.holding(teacher_adapter):
                teacher = self.teacher(indices, batch).to(device)
            mask = response_positions(batch["labels"]).to(device)
            self.small.train()
            logits = self.small(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            self.small.eval()
            loss = kd_loss(logits[mask][:, : self.large.vocab_size], teacher, self.config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        mean_loss = torch.stack(losses).mean().item() if losses else 0.0
        return DistillResult(adapter_state(self.small), mean_loss, time.perf_counter() - started)
