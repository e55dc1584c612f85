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
from fedpt_app.instruct.proxy import LogitsProvider, refuse_embedding_lora, tuned_and_base
from fedpt_app.models.lora import adapter_state, load_adapter_state
from fedpt_app.serving.wire import approximate_top_k, dense_from_top_k, tail_log_mass


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
    teacher_top_k: int = 0  # 0: the large model's full distribution; k: its k largest log-probabilities
    # with teacher_top_k, the tokens outside the large model's top-k: an equal share of the rest ("uniform"), none
    # ("drop"), or that share for the tuned small's top-k only, none for the others ("union")
    teacher_tail: str = "union"


def _forward_at_responses(logits_fn, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rows of logits at the batch's response positions (in row-major order), from right-padded inputs."""
    mask = response_positions(batch["labels"])
    logits = logits_fn(batch["input_ids"], batch["attention_mask"], positions_of(batch["attention_mask"]))
    return logits[mask.to(logits.device)]


def _inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch["input_ids"], batch["attention_mask"], positions_of(batch["attention_mask"])


def _large_at_responses(large: LogitsProvider, batch: dict[str, torch.Tensor], top_k: int = 0) -> torch.Tensor:
    return large.logits_at(*_inputs(batch), response_positions(batch["labels"]), top_k=top_k)


class TeacherCache:
    """What a round's teacher needs of the large model at every response position of the distillation set,
    computed once.

    Full teacher: `zL - alpha * zs_base` (its round-invariant part), one float16 matrix [positions, vocab].
    Top-k teacher (`top_k` > 0): the large model's k largest log-probabilities (float16 values, int32 token ids)
    and the log of the mass outside them (float32): `rows` gives back zL with the other tokens at an equal share of
    that mass (`tail="uniform"`) or ruled out (`tail="drop"`); the small model's offset is then added whole each
    step, so its view of tokens outside the large model's top-k is kept. Arrays are in memory, or `np.memmap`
    files for mode "disk"; `rows(indices)` returns the dense rows of those examples in `collate` order.
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
        tail: str = "uniform",
    ) -> None:
        counts = [response_count(example) for example in examples]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.vocab_size, self.tail = large.vocab_size, tail
        self.top_k = top_k if 0 < top_k < self.vocab_size else 0
        positions = int(self.offsets[-1])
        self.nbytes = positions * (self.top_k * 6 + 4 if self.top_k else self.vocab_size * 2)
        self.mode = mode if self.nbytes <= budget_mb * 2**20 else "off"
        if mode != "off" and self.mode == "off":
            log(
                WARNING,
                "[fedpt-app] teacher cache needs %.0f MB > teacher-cache-mb=%g: recomputing the teacher "
                "every round instead",
                self.nbytes / 2**20,
                budget_mb,
            )
        self.arrays: dict[str, np.ndarray] = {}
        if self.mode == "off":
            return
        started = time.perf_counter()
        self._allocate(directory, positions)
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_token_id)
            first, last = self.offsets[start], self.offsets[min(start + batch_size, len(examples))]
            self._store(slice(first, last), large, small, alpha, batch)
        for array in self.arrays.values():
            if isinstance(array, np.memmap):
                array.flush()
        log(
            INFO,
            "[fedpt-app] teacher cache: %d positions x %s, %.1f MB (%s), built in %.1f s",
            positions,
            f"top-{self.top_k} log-probs of the large model" if self.top_k else f"{self.vocab_size} logits",
            self.nbytes / 2**20,
            self.mode,
            time.perf_counter() - started,
        )

    def _allocate(self, directory: Path, positions: int) -> None:
        shapes = {"values": ((positions, self.top_k or self.vocab_size), np.float16)}
        if self.top_k:
            shapes |= {"token_ids": ((positions, self.top_k), np.int32), "tail": ((positions,), np.float32)}
        for name, (shape, dtype) in shapes.items():
            if self.mode == "disk":
                directory.mkdir(parents=True, exist_ok=True)
                path = directory / f"teacher-cache-{name}.npy"
                self.arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            else:
                self.arrays[name] = np.empty(shape, dtype=dtype)

    def _store(self, rows: slice, large: LogitsProvider, small: PeftModel, alpha: float, batch) -> None:
        large_rows = _large_at_responses(large, batch, self.top_k).cpu()
        if self.top_k:
            values, token_ids = large_rows.topk(self.top_k, dim=-1)
            self.arrays["values"][rows], self.arrays["token_ids"][rows] = values.numpy(), token_ids.numpy()
            self.arrays["tail"][rows] = tail_log_mass(values).numpy()
            return
        with small.disable_adapter():
            base_rows = _forward_at_responses(lambda *a: _no_grad_logits(small, *a), batch)
        self.arrays["values"][rows] = (large_rows - alpha * base_rows[:, : large.vocab_size].cpu()).numpy()

    @property
    def enabled(self) -> bool:
        return bool(self.arrays)

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        def gathered(name: str) -> torch.Tensor:
            array = self.arrays[name]
            return torch.from_numpy(np.concatenate([array[self.offsets[i] : self.offsets[i + 1]] for i in indices]))

        values = gathered("values").float()
        if not self.top_k:
            return values
        return dense_from_top_k(gathered("token_ids").long(), values, gathered("tail"), self.vocab_size, self.tail)


def top_k_mask(rows: torch.Tensor, top_k: int) -> torch.Tensor:
    return torch.zeros_like(rows, dtype=torch.bool).scatter(-1, rows.topk(top_k, dim=-1).indices, True)


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
            tail="uniform" if config.teacher_tail == "union" else config.teacher_tail,
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
        vocab, alpha, top_k = self.large.vocab_size, self.config.alpha, self.config.teacher_top_k
        if self.cache.enabled and not self.cache.top_k:
            tuned = _forward_at_responses(lambda *a: _no_grad_logits(self.small, *a), batch)[:, :vocab]
            return self.cache.rows(indices).to(tuned.device) + alpha * tuned
        if self.cache.enabled:
            large_rows = self.cache.rows(indices)
        else:
            fill = "uniform" if self.config.teacher_tail == "union" else self.config.teacher_tail
            large_rows = approximate_top_k(_large_at_responses(self.large, batch, top_k), top_k, fill)
        (tuned, base), _ = tuned_and_base(self.small, vocab, *_inputs(batch))
        mask = response_positions(batch["labels"]).to(tuned.device)
        tuned, base = tuned[mask], base[mask]
        teacher = large_rows.to(tuned.device) + alpha * (tuned - base)
        if self.config.teacher_tail != "union":
            return teacher
        candidates = top_k_mask(large_rows, top_k) | top_k_mask(tuned, top_k)
        return teacher.masked_fill(~candidates.to(teacher.device), -torch.inf)

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
