"""OpenAI's side of `fedpt-app serve`: the request bodies, the server's limits, the checks that need no model, and
errors in OpenAI's shape ({"error": {"message", "type", "param", "code"}}).

Chat requests go through the project's one prompt template (`build_prompt`): the last message, which must be
the user's, is the instruction; the system message and earlier turns become its input section, one
"Role: text" line each, since the models were tuned on that template and know no chat format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, model_validator

from fedpt_app.instruct.prompts import build_prompt

DEFAULT_MAX_LOGPROBS = 20  # as vLLM's --max-logprobs
MAX_STOP_STRINGS = 4
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


@dataclass
class ServerSettings:
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_tokens_limit: int = 512  # the most new tokens one request may ask for
    api_key: str | None = None  # when set, every /v1 call needs "Authorization: Bearer <key>"
    max_logprobs: int = DEFAULT_MAX_LOGPROBS  # the most alternatives per token a request may ask for


# ------------------------------------------------------------------------------------------------ request bodies


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


# -------------------------------------------------------------------------------------- checks without the model


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


def check_logprobs(logprobs: int | None, limit: int) -> None:
    """Alternatives per token: none, or 0 up to the server's limit (`fedpt-app serve --max-logprobs`)."""
    if logprobs is not None and not 0 <= logprobs <= limit:
        raise APIError(400, f"logprobs must be in [0, {limit}] (this server's max-logprobs)", param="logprobs")


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
