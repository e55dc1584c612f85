"""Batched generation behind `fedpt-app serve`: the served model, one row per prompt, and the worker that decodes
the rows of concurrent requests as one batch.

Every prompt becomes a `Row`; one background task collects the rows that arrive within `batch_wait_s` (up to
`max_batch`) and decodes them as ONE left-padded batch in a worker thread, so the event loop keeps answering.
Rows of a batch may differ in every setting: the batch runs to its longest `max_tokens`, and each row picks its
tokens by its own temperature/top-p (greedy rows share one argmax, sampled rows have their own seeded generator,
so a seed gives the same answer whatever the batch) and finishes at its own EOS, stop strings and `max_tokens`;
a finished row only rides along until the batch ends. Greedy rows equal `decode` run alone on their prompt
(tests/test_openai_api.py checks it). Text is kept raw (not stripped as `decode` does), so streamed chunks add up
to the non-streamed text. `logprobs` are those of the served model's next-token distribution (the proxy's:
softmax of large + alpha * offset) before temperature and top-p, as OpenAI and vLLM report them.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from fedpt_app.instruct.decoding import (
    DecodingConfig,
    StepFn,
    cut_at_stop,
    end_token_ids,
    model_step,
    pick_next,
    positions_of,
    stop_token_ids,
)
from fedpt_app.instruct.proxy import large_only_step, proxy_step, refuse_embedding_lora
from fedpt_app.serving.openai_schema import APIError

MODES = ("proxy", "small", "large")


# ---------------------------------------------------------------------------------------------- the served model


@dataclass
class ServedModel:
    """What the server decodes with: a fresh step function per batch (its KV caches), the tokenizer, the end ids."""

    name: str
    tokenizer: Any
    new_step: Callable[[], StepFn]
    end_ids: frozenset[int]
    context_length: int | None  # prompt + new tokens must fit (the smallest max_position_embeddings); None: any

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @classmethod
    def from_models(cls, mode: str, tokenizer, *, small=None, large=None, alpha: float = 1.0, name: str = ""):
        """`proxy`: large + alpha * (small with adapter - small); `small`: the tuned small; `large`: the large alone.
        `small` is a PeftModel, `large` a LogitsProvider (a `LocalLogitsProvider` for its context length)."""
        vocab_size = len(tokenizer)
        if mode == "proxy":
            refuse_embedding_lora(small)
            new_step, models = (lambda: proxy_step(large, small, alpha)), [small, getattr(large, "model", None)]
        elif mode == "small":
            new_step, models = (lambda: model_step(small, vocab_size)), [small]
        elif mode == "large":
            new_step, models = (lambda: large_only_step(large)), [getattr(large, "model", None)]
        else:
            raise ValueError(f"Unknown model {mode!r}; choose one of {', '.join(MODES)}")
        if small is not None:
            small.eval()
        end_ids = stop_token_ids(tokenizer, (*end_token_ids(*models), *getattr(large, "end_token_ids", ())))
        return cls(name or f"fedpt-{mode}", tokenizer, new_step, frozenset(end_ids), _context_length(models))


def _context_length(models: Sequence[Any]) -> int | None:
    lengths = [
        getattr(model.config.get_text_config(), "max_position_embeddings", None)
        for model in models
        if model is not None and hasattr(model, "config")
    ]
    lengths = [length for length in lengths if length]
    return min(lengths) if lengths else None


# ------------------------------------------------------------------------------------------ rows and their decoding


@dataclass(frozen=True)
class Sampling:
    """One row's settings: how it picks tokens and where it stops."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # alternatives per token (top-k); None: no log-probabilities

    def picking(self) -> DecodingConfig:
        return DecodingConfig(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p)


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability under the served model's next-token distribution, and the top-k."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class RowUpdate:
    """A snapshot the worker thread sends to the request: text safe to show so far, tokens so far, the end."""

    index: int
    text: str
    token_count: int
    finish_reason: str | None = None


class Row:
    """One prompt's generation: its settings, what it produced, and how the worker tells the waiting request."""

    def __init__(self, index: int, prompt_ids: list[int], sampling: Sampling, publish: Callable, stream: bool):
        self.index, self.prompt_ids, self.sampling, self.stream = index, prompt_ids, sampling, stream
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.cancelled = False  # the client went away: decode it no further
        self.generator = None
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed)
        self._publish = publish  # thread-safe: hands a RowUpdate to the request's event loop

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def advance(self, token: int, logits: torch.Tensor, model: ServedModel) -> None:
        """Take the row's next token (an end id finishes it, as in `decode`), then check stop strings and length."""
        if token in model.end_ids:
            return self._finish("stop")
        if self.sampling.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self.sampling.logprobs))
        self.token_ids.append(token)
        full = model.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        self.text = cut_at_stop(full, self.sampling.stop)
        if self.text != full:
            return self._finish("stop")
        if len(self.token_ids) >= self.sampling.max_tokens:
            return self._finish("length")
        if self.stream:
            self._publish(RowUpdate(self.index, visible_text(self.text, self.sampling.stop), len(self.token_ids)))

    def fail(self, error: Exception) -> None:
        """The batch failed: the request answers with a server error (other batches carry on)."""
        if self.finish_reason is None:
            self._publish(error)

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._publish(RowUpdate(self.index, self.text, len(self.token_ids), reason))


def visible_text(text: str, stops: Sequence[str]) -> str:
    """The part of a growing text that can be streamed already: without a trailing partial character, nor a
    trailing start of a stop string (the next token may complete it, and stop strings are never returned)."""
    text = text.rstrip("\ufffd")
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return text[: len(text) - held]


def token_logprob(logits: torch.Tensor, token: int, top_k: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(top_k) if top_k else (logprobs[:0], logprobs[:0].long())
    top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), top)


def left_pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of a left-padded batch, as the tokenizer pads for `decode`."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, width - len(sequence) :] = 1
    return input_ids, attention_mask


def pick_tokens(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Greedy rows share one argmax; each sampled row draws with its own settings and generator."""
    picks = logits.argmax(-1).cpu()
    for index, row in enumerate(rows):
        if row.generator is not None and not row.done:
            picks[index] = pick_next(logits[index : index + 1], row.sampling.picking(), row.generator)[0]
    return picks


def generate_rows(model: ServedModel, rows: Sequence[Row]) -> None:
    """Decode `rows` as one left-padded batch (the loop of `decode`, with per-row settings and log-probabilities)."""
    step = model.new_step()
    step_ids, attention_mask = left_pad([row.prompt_ids for row in rows], model.pad_id)
    step_positions = positions_of(attention_mask)
    for _ in range(max(row.sampling.max_tokens for row in rows)):
        logits = step(step_ids, attention_mask, step_positions)
        next_ids = pick_tokens(logits, rows)
        for index, row in enumerate(rows):
            if not row.done:
                row.advance(int(next_ids[index]), logits[index], model)
        finished = torch.tensor([row.done for row in rows])
        if finished.all():
            return
        next_ids = next_ids.masked_fill(finished, model.pad_id)
        attention_mask = torch.cat([attention_mask, torch.ones(len(rows), 1, dtype=attention_mask.dtype)], dim=1)
        step_ids, step_positions = next_ids[:, None], step_positions[:, -1:] + 1


# ------------------------------------------------------------------------------------------------------ batching


class Job:
    """One request's rows (one per prompt) and the queue their updates arrive on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.rows: list[Row] = []
        self.updates: asyncio.Queue[RowUpdate | BaseException] = asyncio.Queue()

    def add_row(self, prompt_ids: list[int], sampling: Sampling, stream: bool) -> Row:
        row = Row(len(self.rows), prompt_ids, sampling, self.publish, stream)
        self.rows.append(row)
        return row

    def publish(self, update: RowUpdate | BaseException) -> None:
        """Called from the worker thread."""
        self.loop.call_soon_threadsafe(self.updates.put_nowait, update)

    async def stream(self) -> AsyncIterator[RowUpdate]:
        """Every update until each row has finished; a failed batch raises here."""
        open_rows = len(self.rows)
        while open_rows:
            update = await self.updates.get()
            if isinstance(update, BaseException):
                raise APIError(500, f"Generation failed: {update}", "server_error", code="generation_failed")
            open_rows -= update.finish_reason is not None
            yield update

    async def wait(self) -> None:
        async for _ in self.stream():
            pass

    def cancel(self) -> None:
        for row in self.rows:
            row.cancelled = True


class BatchScheduler:
    """One background task: collects rows for up to `wait_s` (at most `max_batch`), decodes them in ONE batch in
    a worker thread, and starts over. Rows that queued while a batch ran go into the next one without waiting."""

    def __init__(self, model: ServedModel, max_batch: int = 8, wait_s: float = 0.005) -> None:
        if max_batch < 1:
            raise ValueError("max-batch must be at least 1")
        self.model, self.max_batch, self.wait_s = model, max_batch, wait_s
        self.queue: asyncio.Queue[Row] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="fedpt-decode")
        self.batch_sizes: list[int] = []  # for tests and benchmarks: how requests were grouped

    def submit(self, job: Job) -> None:
        for row in job.rows:
            self.queue.put_nowait(row)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            rows = [row for row in await self.next_batch() if not row.cancelled]
            if not rows:
                continue
            self.batch_sizes.append(len(rows))
            try:
                await loop.run_in_executor(self.executor, generate_rows, self.model, rows)
            except Exception as error:  # a failed batch fails its requests, never the server
                for row in rows:
                    row.fail(error)

    async def next_batch(self) -> list[Row]:
        rows = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(rows) < self.max_batch:
            if not self.queue.empty():
                rows.append(self.queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                rows.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return rows
