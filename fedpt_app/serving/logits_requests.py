"""What the logits service accepts (`fedpt-logits/1`): the request bodies, the gate every call passes (bearer token,
body size, schema) and the error every refusal answers with. docs/serving.md has the protocol."""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import HTTPConnection, Request


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LogprobsRequest(_Strict):
    input_ids: list[list[int]]
    attention_mask: list[list[int]] | None = None  # default: all ones (no padding)
    last: int = 1  # log-probs of the last `last` positions of each row (0: all)
    select: list[list[int]] | None = None  # or: of the positions marked 1 (row-major), instead of `last`
    top_k: int = 0  # 0: the full vocabulary
    dtype: Literal["float32", "float16"] = "float32"


class SessionRequest(_Strict):
    input_ids: list[list[int]]
    attention_mask: list[list[int]] | None = None
    last: int = 1
    top_k: int = 0
    dtype: Literal["float32", "float16"] = "float32"


class ExtendRequest(SessionRequest):
    past: int | None = None  # keep this many cached positions first (default: all); the mask covers the new ones


class StreamMessage(_Strict):
    """One call on `/v1/stream`: `open` (request: a SessionRequest), `extend` or `close` a session."""

    op: Literal["open", "extend", "close"]
    session: str = ""  # extend, close
    request: dict[str, Any] = {}  # open, extend: the body the HTTP call takes


class Gate:
    """What every call passes first: the bearer token, the body size, the body's schema."""

    def __init__(self, token: str, max_body_bytes: int) -> None:
        if not token:
            raise ValueError("the service needs a non-empty bearer token")
        self.token, self.max_body_bytes = token.encode(), max_body_bytes

    def authorize(self, request: HTTPConnection) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), self.token):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    async def parsed(self, request: Request, model: type[BaseModel]) -> Any:
        self.authorize(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:  # refused before reading it
            raise RequestError(413, f"request body over {self.max_body_bytes} bytes")
        return self.validated(await request.body(), model)

    def validated(self, body: bytes | str, model: type[BaseModel]) -> Any:
        if len(body) > self.max_body_bytes:
            raise RequestError(413, f"request body over {self.max_body_bytes} bytes")
        return conforming(model, body)

    def stream_call(self, data: bytes | str) -> tuple[str, str, BaseModel | None]:
        """(op, session id, its request) of a `/v1/stream` message, checked as the HTTP calls' bodies are."""
        message = self.validated(data, StreamMessage)
        if message.op != "open" and not message.session:
            raise RequestError(400, f"malformed request: {message.op} needs the session's id")
        kinds = {"open": SessionRequest, "extend": ExtendRequest, "close": None}
        request = kinds[message.op] and conforming(kinds[message.op], message.request)
        return message.op, message.session, request


def conforming(model: type[BaseModel], data: bytes | str | dict) -> Any:
    """`data` (JSON, or a dict parsed from it) as a `model`, or a 400 that names the first problems."""
    try:
        return model.model_validate(data) if isinstance(data, dict) else model.model_validate_json(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:5])
        raise RequestError(400, f"malformed request: {problems}") from None


def error_body(error: RequestError) -> dict:
    return {"error": {"message": error.message, "status": error.status}}
