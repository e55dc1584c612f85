"""The answers of `fedpt-app serve` in OpenAI's shapes: a whole response, or its Server-Sent Events chunks as the
rows produce text (the role first for chat, text deltas, each choice's finish, usage if asked, then [DONE]),
with log-probabilities in the legacy completions' or the chat shape. Text is returned raw, so streamed chunks add
up to the non-streamed text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi.responses import StreamingResponse

from fedpt_app.serving.batched_generation import Job, Row, ServedModel, TokenLogprob
from fedpt_app.serving.openai_schema import APIError, SamplingFields


def usage(rows: Sequence[Row]) -> dict[str, int]:
    prompt, completion = sum(len(r.prompt_ids) for r in rows), sum(len(r.token_ids) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_text(tokenizer: Any, token_id: int, as_ids: bool) -> str:
    """A token as the answer shows it: its text, or vLLM's "token_id:123" (`return_tokens_as_token_ids`)."""
    return f"token_id:{token_id}" if as_ids else tokenizer.decode([token_id])


def completion_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob], as_ids: bool, offset: int = 0) -> dict:
    """Legacy completions' shape; the chosen token is always among top_logprobs (up to k + 1 entries)."""
    tokens = [token_text(tokenizer, entry.token_id, as_ids) for entry in entries]
    offsets = [offset + sum(len(token) for token in tokens[:i]) for i in range(len(tokens))]
    top = [
        {token_text(tokenizer, t, as_ids): lp for t, lp in (*entry.top, (entry.token_id, entry.logprob))}
        for entry in entries
    ]
    return {
        "tokens": tokens,
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob], as_ids: bool) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id, as_ids)
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

    def __init__(self, model: ServedModel, job: Job, request: SamplingFields, chat: bool) -> None:
        self.model, self.job, self.request, self.chat = model, job, request, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def envelope(self, choices: list[dict], chunk: bool = False) -> dict:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model.name,
            "choices": choices,
        }

    def logprobs(self, entries: Sequence[TokenLogprob], offset: int = 0) -> dict:
        as_ids = self.request.return_tokens_as_token_ids
        if self.chat:
            return chat_logprobs(self.model.tokenizer, entries, as_ids)
        return completion_logprobs(self.model.tokenizer, entries, as_ids, offset)

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
