"""`fedpt-app serve`: a tuned run as an OpenAI-compatible HTTP API (`/v1/models`, `/v1/completions`,
`/v1/chat/completions`, streaming as Server-Sent Events), so any OpenAI client can query it.

Batching: every prompt becomes a `Row`; one background task collects the rows that arrive within `batch_wait_s`
(up to `max_batch`) and decodes them as ONE left-padded batch in a worker thread, so the event loop keeps
answering. Rows of a batch may differ in every setting: the batch runs to its longest `max_tokens`, and each row
picks its tokens by its own temperature/top-p (greedy rows share one argmax, sampled rows have their own seeded
generator, so a seed gives the same answer whatever the batch) and finishes at its own EOS, stop strings and
`max_tokens`; a finished row only rides along until the batch ends. Greedy rows equal `decode` run alone on
their prompt (tests/test_openai_api.py checks it). Text is returned raw (not stripped as `decode` does), so
streamed chunks add up to the non-streamed text. `logprobs` are those of the served model's next-token distribution
(the proxy's: softmax of large + alpha * offset) before temperature and top-p, as OpenAI and vLLM report them.

Chat requests go through the project's one prompt template (`build_prompt`): the last message, which must be
the user's, is the instruction; the system message and earlier turns become its input section, one
"Role: text" line each, since the models were tuned on that template and know no chat format. Chat always
stops at the template's section marker ("###"); completions prompts are used raw and stop only where asked.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedpt_app.instruct.decoding import (
    DEFAULT_STOP_STRINGS,
    DecodingConfig,
    StepFn,
    cut_at_stop,
    end_token_ids,
    model_step,
    pick_next,
    positions_of,
)
from fedpt_app.instruct.prompts import build_prompt
from fedpt_app.instruct.proxy import large_only_step, proxy_step, refuse_embedding_lora

MODES = ("proxy", "small", "large")
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 4
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


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
        end_ids = {tokenizer.eos_token_id, *end_token_ids(*models), *getattr(large, "end_token_ids", ())}
        return cls(name or f"fedpt-{mode}", tokenizer, new_step, frozenset(end_ids), _context_length(models))


def _context_length(models: Sequence[Any]) -> int | None:
    lengths = [
        getattr(model.config.get_text_config(), "max_position_embeddings", None)
        for model in models
        if model is not None and hasattr(model, "config")
    ]
    lengths = [length for length in lengths if length]
    return min(lengths) if lengths else None


def load_served_model(
    mode: str,
    small_ref: str,
    large_ref: str,
    adapter_dir: str,
    *,
    alpha: float = 1.0,
    quantization: str = "none",
    name: str = "",
) -> ServedModel:
    """Load only what `mode` needs, once: the small with its adapter, the large as a logits provider."""
    from peft import PeftModel

    from fedpt_app.instruct.proxy import LocalLogitsProvider, check_logit_widths, load_logits_provider
    from fedpt_app.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(large_ref if mode == "large" else small_ref)
    small = None
    if mode != "large":  # an uncached base: peft injects the adapter in place, the loader's cache stays clean
        small = PeftModel.from_pretrained(load_causal_lm.__wrapped__(small_ref), adapter_dir)
    large = None
    if mode == "proxy":  # a local large or a serve-logits URL, checked against the small's tokenizer
        large = load_logits_provider(small_ref, large_ref, quantization, tokenizer)
    elif mode == "large":
        large = LocalLogitsProvider(large_ref, len(tokenizer), quantization)
        check_logit_widths(len(tokenizer), {large_ref: large.model.config.get_text_config().vocab_size})
    return ServedModel.from_models(mode, tokenizer, small=small, large=large, alpha=alpha, name=name)


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
                    if row.finish_reason is None:
                        row._publish(error)

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


# ------------------------------------------------------------------------------------------------ API: requests


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model: str

    @model_validator(mode="before")
    @classmethod
    def nulls_mean_defaults(cls, data: Any) -> Any:
        """Clients may send `"temperature": null` and the like: the default then."""
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data

    max_tokens: int | None = None
    temperature: float = 1.0  # OpenAI's default: sampling unless asked for 0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_tokens_as_token_ids: bool = False  # vLLM's extension: tokens as "token_id:123"


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


@dataclass
class ServerSettings:
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_tokens_limit: int = 512  # the most new tokens one request may ask for
    api_key: str | None = None  # when set, every /v1 call needs "Authorization: Bearer <key>"


@dataclass
class Service:
    """Request checking and the answers' shapes, around the model and its scheduler."""

    model: ServedModel
    settings: ServerSettings
    scheduler: BatchScheduler = field(init=False)

    def __post_init__(self) -> None:
        self.scheduler = BatchScheduler(self.model, self.settings.max_batch, self.settings.batch_wait_ms / 1000)

    def check_model(self, name: str) -> None:
        if name != self.model.name:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server serves {self.model.name!r}",
                param="model",
                code="model_not_found",
            )

    def completion_prompts(self, prompt) -> list[list[int]]:
        """Token ids of each prompt: strings are tokenized raw (no template), token-id lists are taken as they are."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "The prompt is empty", param="prompt", code="empty_prompt")
        return [self.prompt_ids(item, "prompt") for item in prompt]

    def prompt_ids(self, prompt: str | list[int], param: str) -> list[int]:
        ids = self.model.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids or (isinstance(prompt, str) and not prompt):
            raise APIError(400, "The prompt is empty", param=param, code="empty_prompt")
        if any(not 0 <= token < len(self.model.tokenizer) for token in ids):
            raise APIError(400, f"Token ids must be in [0, {len(self.model.tokenizer)})", param=param)
        return ids

    def sampling(self, request: SamplingFields, prompt_length: int, max_tokens, default: int, logprobs, stop=()):
        """The row settings of a request, or a 400 naming the first bad field."""
        check_common_fields(request)
        max_tokens = self.new_token_budget(request, prompt_length, max_tokens, default)
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}]", param="logprobs")
        stops = tuple(dict.fromkeys((*stop, *stop_strings(request.stop))))
        return Sampling(max_tokens, request.temperature, request.top_p, stops, request.seed, logprobs)

    def new_token_budget(self, request: SamplingFields, prompt_length: int, max_tokens: int | None, default: int):
        """max_tokens as asked (checked against the limit and the context left), or the default that fits."""
        limit, context = self.settings.max_tokens_limit, self.model.context_length
        room = context - prompt_length if context else limit
        where = "messages" if isinstance(request, ChatRequest) else "prompt"
        if max_tokens is not None and not 1 <= max_tokens <= limit:
            raise APIError(
                400,
                f"max_tokens must be in [1, {limit}], got {max_tokens}",
                param="max_tokens",
                code="invalid_max_tokens",
            )
        max_tokens = max_tokens or min(default, limit, room)
        if max_tokens > room or room < 1:
            raise APIError(
                400,
                f"This model's context is {context} tokens; the prompt has {prompt_length} and "
                f"max_tokens asks for {max_tokens}",
                param=where,
                code="context_length_exceeded",
            )
        return max_tokens

    def start(self, prompts: list[list[int]], samplings: list[Sampling], stream: bool) -> Job:
        job = Job(asyncio.get_running_loop())
        for prompt_ids, sampling in zip(prompts, samplings, strict=True):
            job.add_row(prompt_ids, sampling, stream)
        self.scheduler.submit(job)
        return job

    def token_text(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.model.tokenizer.decode([token_id])


def check_common_fields(request: SamplingFields) -> None:
    if request.n != 1:
        raise APIError(400, "Only n=1 is supported", param="n", code="unsupported_n")
    if not 0.0 <= request.temperature <= 2.0:
        raise APIError(400, "temperature must be in [0, 2]", param="temperature")
    if not 0.0 < request.top_p <= 1.0:
        raise APIError(400, "top_p must be in (0, 1]", param="top_p")
    if getattr(request, "echo", False):
        raise APIError(400, "echo is not supported", param="echo")
    stops = stop_strings(request.stop)
    if len(stops) > MAX_STOP_STRINGS or any(not stop for stop in stops):
        raise APIError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", param="stop")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


def chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """The last (user) message as the template's instruction; the system message and earlier turns as its input,
    one "Role: text" line each."""
    if not messages or messages[-1].role != "user":
        raise APIError(400, "The last message must be the user's", param="messages")
    texts = [message_text(message, index) for index, message in enumerate(messages)]
    if not texts[-1].strip():
        raise APIError(400, "The last user message is empty", param="messages", code="empty_prompt")
    turns = zip(messages[:-1], texts[:-1], strict=True)
    context = "\n".join(f"{message.role.capitalize()}: {text}" for message, text in turns if text.strip())
    return build_prompt(texts[-1], context)


def message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(part.get("type") != "text" for part in message.content):
        raise APIError(400, "Only text content parts are supported", param=f"messages[{index}].content")
    return "".join(str(part.get("text", "")) for part in message.content)


# ----------------------------------------------------------------------------------------------- API: answers


def usage(rows: Sequence[Row]) -> dict[str, int]:
    prompt, completion = sum(len(r.prompt_ids) for r in rows), sum(len(r.token_ids) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(service: Service, entries: Sequence[TokenLogprob], as_ids: bool, offset: int = 0) -> dict:
    """Legacy completions' shape; the chosen token is always among top_logprobs (up to k + 1 entries)."""
    tokens = [service.token_text(entry.token_id, as_ids) for entry in entries]
    offsets = [offset + sum(len(token) for token in tokens[:i]) for i in range(len(tokens))]
    top = [
        {service.token_text(t, as_ids): lp for t, lp in (*entry.top, (entry.token_id, entry.logprob))}
        for entry in entries
    ]
    return {
        "tokens": tokens,
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(service: Service, entries: Sequence[TokenLogprob], as_ids: bool) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = service.token_text(token_id, as_ids)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**item(entry.token_id, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top]}
            for entry in entries
        ]
    }


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Answer:
    """The shared fields of one response and its chunks."""

    def __init__(self, service: Service, job: Job, request: SamplingFields, chat: bool) -> None:
        self.service, self.job, self.request, self.chat = service, job, request, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def envelope(self, choices: list[dict], chunk: bool = False) -> dict:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.service.model.name,
            "choices": choices,
        }

    def logprobs(self, entries: Sequence[TokenLogprob], offset: int = 0) -> dict:
        as_ids = self.request.return_tokens_as_token_ids
        if self.chat:
            return chat_logprobs(self.service, entries, as_ids)
        return completion_logprobs(self.service, entries, as_ids, offset)

    def full(self) -> dict:
        choices = []
        for row in self.job.rows:
            logprobs = self.logprobs(row.logprobs) if row.sampling.logprobs is not None else None
            content = {"message": {"role": "assistant", "content": row.text}} if self.chat else {"text": row.text}
            choices.append({"index": row.index, **content, "logprobs": logprobs, "finish_reason": row.finish_reason})
        return {**self.envelope(choices), "usage": usage(self.job.rows)}

    async def chunks(self) -> AsyncIterator[str]:
        """SSE lines: the role first (chat), text deltas, each choice's finish, usage if asked, then [DONE]."""
        sent_text = [0] * len(self.job.rows)
        sent_tokens = [0] * len(self.job.rows)
        if self.chat:
            yield sse(self.envelope([self.choice_delta(0, {"role": "assistant", "content": ""}, None)], True))
        async for update in self.job.stream():
            row = self.job.rows[update.index]
            text = update.text[sent_text[update.index] :]
            entries = row.logprobs[sent_tokens[update.index] : update.token_count]
            if text or entries or update.finish_reason:
                logprobs = (
                    self.logprobs(entries, sent_text[update.index]) if row.sampling.logprobs is not None else None
                )
                delta = {"content": text} if self.chat else {"text": text}
                choice = self.choice_delta(update.index, delta, update.finish_reason, logprobs)
                yield sse(self.envelope([choice], True))
            sent_text[update.index], sent_tokens[update.index] = len(update.text), update.token_count
        if self.request.stream_options and self.request.stream_options.include_usage:
            yield sse({**self.envelope([], True), "usage": usage(self.job.rows)})
        yield sse("[DONE]")

    def choice_delta(self, index: int, delta: dict, finish_reason, logprobs=None) -> dict:
        body = {"delta": delta} if self.chat else delta
        return {"index": index, **body, "logprobs": logprobs, "finish_reason": finish_reason}


async def respond(answer: Answer):
    if answer.request.stream:
        return StreamingResponse(cancel_on_exit(answer), media_type="text/event-stream")
    await answer.job.wait()
    return answer.full()


async def cancel_on_exit(answer: Answer) -> AsyncIterator[str]:
    """A client that leaves mid-stream frees its rows: the worker stops decoding them."""
    try:
        async for line in answer.chunks():
            yield line
    except APIError as error:
        yield sse({"error": {"message": error.message, "type": error.kind, "param": None, "code": error.code}})
    finally:
        answer.job.cancel()


# --------------------------------------------------------------------------------------------------- the app


def create_app(model: ServedModel, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts the batching worker (so it runs on the server's event loop)."""
    service = Service(model, settings or ServerSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(service.scheduler.run())
        yield
        worker.cancel()
        service.scheduler.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="fedpt-app serve", lifespan=lifespan, dependencies=[Depends(api_key_check(service))])
    app.state.service = service
    add_error_handlers(app)

    @app.get("/v1/models")
    async def list_models() -> dict:
        card = {"id": model.name, "object": "model", "created": 0, "owned_by": "fedpt-app"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        service.check_model(request.model)
        prompts = service.completion_prompts(request.prompt)
        max_tokens = request.max_tokens
        samplings = [
            service.sampling(request, len(ids), max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, request.logprobs)
            for ids in prompts
        ]
        return await respond(Answer(service, service.start(prompts, samplings, request.stream), request, chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        service.check_model(request.model)
        ids = service.prompt_ids(chat_prompt(request.messages), "messages")
        max_tokens = request.max_completion_tokens or request.max_tokens
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        sampling = service.sampling(
            request, len(ids), max_tokens, service.settings.max_tokens_limit, logprobs, stop=DEFAULT_STOP_STRINGS
        )
        return await respond(Answer(service, service.start([ids], [sampling], request.stream), request, chat=True))

    return app


def api_key_check(service: Service) -> Callable:
    """A dependency: with an API key set, a matching "Authorization: Bearer <key>" (constant-time compare)."""

    async def check(request: Request) -> None:
        expected = service.settings.api_key
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
            raise APIError(401, "Missing or invalid API key (send Authorization: Bearer <key>)", code="invalid_api_key")

    return check


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = location[0] if location else None
        message = f"Invalid request: {'.'.join(location) or 'body'}: {first.get('msg', 'malformed')}"
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return APIError(error.status_code, str(error.detail), kind).response()


# ------------------------------------------------------------------------------------------------- running it


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """A real uvicorn server in a thread (port 0: a free one); yields its base URL ("http://host:port/v1")."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="fedpt-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("The API server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
