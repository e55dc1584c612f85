"""`fedpt-app serve-logits`: the large model's owner serves next-token log-probabilities, never the weights.

Protocol `fedpt-logits/1` (docs/serving.md), JSON over HTTP(S), every call but `/healthz` with a bearer token:
- `GET /v1/info`: model, vocabulary size and fingerprint, end-token ids, limits;
- `POST /v1/logprobs`: a batch of token-id sequences, stateless; the log-probabilities of the last `last`
  positions, or of the positions `select` marks (teacher forcing: the distillation cache);
- `POST /v1/sessions`, `POST /v1/sessions/{id}/extend`, `DELETE /v1/sessions/{id}`: incremental decoding with
  the KV cache kept here; `extend` may first roll the cache back to `past` positions (speculative decoding);
- `WS /v1/stream`: the same three session calls as messages over one WebSocket, answered in order (no HTTP
  request per decoded token); the sessions a connection opened close with it.
A bad request is refused with a 4xx and a message before it touches any state; a forward that fails drops only
its own session. Forwards run one at a time in a worker thread, so the event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fedpt_app.instruct.decoding import crop_cache, positions_of
from fedpt_app.instruct.proxy import LocalLogitsProvider, shared_vocab_size
from fedpt_app.serving.logits_requests import (
    ExtendRequest,
    Gate,
    LogprobsRequest,
    RequestError,
    SessionRequest,
    error_body,
)
from fedpt_app.serving.wire import PROTOCOL, encode_logprobs, vocabulary_sha256


@dataclass(frozen=True)
class ServiceLimits:
    max_batch: int = 32
    max_positions: int = 4096  # per sequence, a session's cache included
    max_request_tokens: int = 65_536  # batch x new tokens of one request
    max_sessions: int = 64
    session_ttl_s: float = 600.0  # an idle session is dropped after this long
    max_body_bytes: int = 16 * 2**20


@dataclass
class Session:
    cache: Any
    attention_mask: torch.Tensor  # [B, length]: the mask of every cached position
    last_used: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]


class LogitsEngine:
    """The model, its vocabulary and the open sessions; every check happens before a forward."""

    def __init__(self, provider: LocalLogitsProvider, tokenizer, model_ref: str, limits: ServiceLimits) -> None:
        self.provider, self.model_ref, self.limits = provider, model_ref, limits
        self.vocab_size = provider.vocab_size
        self.info = {
            "protocol": PROTOCOL,
            "model": model_ref,
            "vocab_size": self.vocab_size,
            "vocabulary_sha256": vocabulary_sha256(tokenizer),
            "end_token_ids": list(provider.end_token_ids),
            "limits": asdict(limits),
            "transports": ["http", "websocket"],  # websocket: the session calls over /v1/stream
        }
        self.sessions: dict[str, Session] = {}

    # ---- validation -----------------------------------------------------------------------------------------
    def tensors(self, request: SessionRequest, past: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids [B, t], their attention mask [B, t]) after checking shapes, ranges and limits."""
        ids, limits = request.input_ids, self.limits
        if not ids or not ids[0]:
            raise RequestError(400, "input_ids must be a non-empty batch of non-empty sequences")
        width = len(ids[0])
        if any(len(row) != width for row in ids):
            raise RequestError(400, "input_ids must be rectangular (left-pad the batch and send an attention_mask)")
        if len(ids) > limits.max_batch:
            raise RequestError(413, f"batch of {len(ids)} sequences: the limit is {limits.max_batch}")
        if len(ids) * width > limits.max_request_tokens:
            raise RequestError(
                413, f"{len(ids) * width} tokens in one request: the limit is {limits.max_request_tokens}"
            )
        if past + width > limits.max_positions:
            raise RequestError(413, f"{past + width} positions per sequence: the limit is {limits.max_positions}")
        input_ids = torch.tensor(ids, dtype=torch.long)
        if input_ids.min() < 0 or input_ids.max() >= self.vocab_size:
            raise RequestError(400, f"token ids must be in [0, {self.vocab_size}) (the vocabulary of {self.model_ref})")
        mask = request.attention_mask if request.attention_mask is not None else [[1] * width for _ in ids]
        attention_mask = torch.tensor(mask, dtype=torch.long) if mask and mask[0] else torch.zeros(0)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise RequestError(400, f"attention_mask must be {len(ids)} x {width}, the shape of input_ids")
        if ((attention_mask != 0) & (attention_mask != 1)).any():
            raise RequestError(400, "attention_mask must hold 0 and 1 only")
        if not 0 <= request.last <= width:
            raise RequestError(400, f"last must be in [0, {width}] (the number of new positions)")
        if not 0 <= request.top_k <= self.vocab_size:
            raise RequestError(400, f"top_k must be in [0, {self.vocab_size}]")
        return input_ids, attention_mask

    def selection(self, select: list[list[int]], shape: torch.Size) -> torch.Tensor:
        mask = torch.tensor(select, dtype=torch.long) if select and select[0] else torch.zeros(0)
        if mask.shape != shape or ((mask != 0) & (mask != 1)).any():
            raise RequestError(400, f"select must be a 0/1 mask of the input_ids' shape {list(shape)}")
        return mask.bool()

    def session(self, session_id: str) -> Session:
        self.drop_expired()
        if session_id not in self.sessions:
            raise RequestError(
                404,
                f"no session {session_id!r} (closed, expired after {self.limits.session_ttl_s:g} s, or never opened)",
            )
        return self.sessions[session_id]

    def drop_expired(self) -> None:
        now = time.monotonic()
        for session_id in [key for key, s in self.sessions.items() if now - s.last_used > self.limits.session_ttl_s]:
            del self.sessions[session_id]

    # ---- forwards -------------------------------------------------------------------------------------------
    def logprobs(self, input_ids, attention_mask, cache=None, use_cache=False, last=0) -> tuple[torch.Tensor, Any]:
        """The local provider's own computation (a local run and a remote one see the same numbers); positions
        follow from the mask, as every caller in the project computes them."""
        positions = positions_of(attention_mask)[:, -input_ids.shape[1] :]
        rows, cache = self.provider.logits(input_ids, attention_mask, positions, cache, use_cache, last)
        return rows.cpu(), cache

    def stateless(self, request: LogprobsRequest) -> dict:
        input_ids, attention_mask = self.tensors(request)
        if request.select is not None:
            select = self.selection(request.select, input_ids.shape)
            rows = self.provider.logits_at(input_ids, attention_mask, positions_of(attention_mask), select).cpu()
        else:
            rows = self.logprobs(input_ids, attention_mask, last=request.last)[0]
        return {"logprobs": encode_logprobs(rows, request.top_k, request.dtype)}

    def open_session(self, request: SessionRequest) -> dict:
        input_ids, attention_mask = self.tensors(request)
        self.drop_expired()
        if len(self.sessions) >= self.limits.max_sessions:
            raise RequestError(
                429, f"{len(self.sessions)} sessions open (the limit): close some (DELETE) or let them expire"
            )
        rows, cache = self.logprobs(input_ids, attention_mask, use_cache=True, last=request.last)
        session_id = uuid.uuid4().hex
        self.sessions[session_id] = Session(cache, attention_mask)
        return {
            "session": session_id,
            "length": input_ids.shape[1],
            "logprobs": encode_logprobs(rows, request.top_k, request.dtype),
        }

    def extend(self, session_id: str, request: ExtendRequest) -> dict:
        session = self.session(session_id)
        past = session.length if request.past is None else request.past
        if not 0 <= past <= session.length:
            raise RequestError(400, f"past must be in [0, {session.length}] (the session's cached positions)")
        input_ids, new_mask = self.tensors(request, past)
        batch = session.attention_mask.shape[0]
        if input_ids.shape[0] != batch:
            raise RequestError(400, f"the session holds {batch} sequences, got {input_ids.shape[0]}")
        attention_mask = torch.cat([session.attention_mask[:, :past], new_mask], dim=1)
        try:
            crop_cache(session.cache, past)
            rows, session.cache = self.logprobs(input_ids, attention_mask, session.cache, True, request.last)
        except Exception as error:  # its cache may be half-updated: this session only is lost
            del self.sessions[session_id]
            raise RequestError(500, f"the forward failed ({error}); session {session_id} was closed") from error
        session.attention_mask, session.last_used = attention_mask, time.monotonic()
        return {
            "session": session_id,
            "length": session.length,
            "logprobs": encode_logprobs(rows, request.top_k, request.dtype),
        }

    def close(self, session_id: str) -> dict:
        self.session(session_id)
        del self.sessions[session_id]
        return {"closed": session_id}

    def drop(self, session_ids: set[str]) -> None:
        """Forget these sessions, whichever of them are still open (a closed stream's)."""
        for session_id in session_ids:
            self.sessions.pop(session_id, None)


def create_app(engine: LogitsEngine, token: str) -> FastAPI:
    """The service's routes over `engine`; `token` is the bearer token every call but /healthz must carry."""
    gate = Gate(token, engine.limits.max_body_bytes)
    app = FastAPI(title="fedpt-app logits service", version=PROTOCOL)
    forward_lock = asyncio.Lock()

    async def locked(work, *args) -> dict:
        async with forward_lock:  # one forward at a time: the model's threads are the machine's
            return await run_in_threadpool(work, *args)

    async def run(work, *args) -> JSONResponse:
        return JSONResponse(await locked(work, *args))

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error_body(error), status_code=error.status)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info(request: Request) -> dict:
        gate.authorize(request)
        return engine.info | {"open_sessions": len(engine.sessions)}

    @app.post("/v1/logprobs")
    async def logprobs(request: Request) -> JSONResponse:
        return await run(engine.stateless, await gate.parsed(request, LogprobsRequest))

    @app.post("/v1/sessions")
    async def open_session(request: Request) -> JSONResponse:
        return await run(engine.open_session, await gate.parsed(request, SessionRequest))

    @app.post("/v1/sessions/{session_id}/extend")
    async def extend(session_id: str, request: Request) -> JSONResponse:
        return await run(engine.extend, session_id, await gate.parsed(request, ExtendRequest))

    @app.delete("/v1/sessions/{session_id}")
    async def close(session_id: str, request: Request) -> dict:
        gate.authorize(request)
        async with forward_lock:
            return engine.close(session_id)

    add_session_stream(app, engine, gate, locked)
    return app


def add_session_stream(app: FastAPI, engine: LogitsEngine, gate: Gate, locked) -> None:
    """`WS /v1/stream`: the session calls as messages on one connection, answered in order; a refused message is
    answered with its error and the connection stays open; the sessions a connection opened close with it."""

    async def stream_answer(data: bytes | str, opened: set[str]) -> dict:
        try:
            op, session_id, body = gate.stream_call(data)
            if op == "open":
                answer = await locked(engine.open_session, body)
                opened.add(answer["session"])
            elif op == "extend":
                answer = await locked(engine.extend, session_id, body)
            else:
                answer = await locked(engine.close, session_id)
                opened.discard(session_id)
            return answer
        except RequestError as error:  # answered on the connection, which stays open
            return error_body(error)

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket) -> None:
        try:
            gate.authorize(websocket)
        except RequestError as error:
            await websocket.close(code=1008, reason=error.message)
            return
        await websocket.accept()
        opened: set[str] = set()
        try:
            while (message := await websocket.receive())["type"] != "websocket.disconnect":
                answer = await stream_answer(message.get("bytes") or message.get("text") or "", opened)
                await websocket.send_text(json.dumps(answer))
        except WebSocketDisconnect:
            pass
        finally:
            await locked(engine.drop, opened)  # the connection's sessions go with it


def read_token(token_file: str) -> str:
    path = Path(token_file).expanduser()
    if not path.is_file():
        raise ValueError(f"--token-file {token_file!r}: no such file")
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"--token-file {token_file!r}: the token must be at least 16 characters")
    return token


def serve(
    model_ref: str,
    *,
    host: str,
    port: int,
    token_file: str,
    quantization: str = "none",
    limits: ServiceLimits = ServiceLimits(),
    tls_certfile: str = "",
    tls_keyfile: str = "",
    allow_plain_http: bool = False,
) -> None:
    """Load the model once and serve it until interrupted (uvicorn; TLS when a certificate is given)."""
    import uvicorn

    from fedpt_app.models.loading import load_tokenizer
    from fedpt_app.serving.background import WEBSOCKETS
    from fedpt_app.serving.remote import is_loopback

    token = read_token(token_file)
    if bool(tls_certfile) != bool(tls_keyfile):
        raise ValueError("TLS needs both --tls-certfile and --tls-keyfile")
    if not tls_certfile and not is_loopback(host) and not allow_plain_http:
        raise ValueError(
            f"--host {host}: the bearer token would cross the network in clear text; give --tls-certfile and "
            "--tls-keyfile (or --allow-plain-http behind a TLS-terminating proxy)"
        )
    provider = LocalLogitsProvider(model_ref, shared_vocab_size(model_ref, model_ref), quantization, spread=True)
    engine = LogitsEngine(provider, load_tokenizer(model_ref), model_ref, limits)
    tls = {"ssl_certfile": tls_certfile, "ssl_keyfile": tls_keyfile} if tls_certfile else {}
    # a stop signal waits at most 10 s for requests in flight (idle keep-alive clients do not hold it up)
    # a WebSocket message a little over the body limit still gets its 413 answer; far over, uvicorn drops it
    uvicorn.run(
        create_app(engine, token),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=10,
        ws=WEBSOCKETS,
        ws_max_size=limits.max_body_bytes + 2**20,
        **tls,
    )
