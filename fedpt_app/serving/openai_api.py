"""`fedpt-app serve`: a tuned run as an OpenAI-compatible HTTP API (`/v1/models`, `/v1/completions`,
`/v1/chat/completions`, streaming as Server-Sent Events), so any OpenAI client can query it.

This module loads the served model, checks each request against it and the server's limits, and builds the app
(routes, API key, errors). The pieces around it: `openai_schema` (request bodies, limits, OpenAI-style errors),
`batched_generation` (the served model, one row per prompt, the worker that decodes concurrent requests as one
batch) and `openai_answers` (responses and their streamed chunks). Chat prompts go through the project's prompt
template and always stop at its section marker ("###"); completions prompts are used raw and stop only where asked.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedpt_app.instruct.decoding import DEFAULT_STOP_STRINGS
from fedpt_app.serving.batched_generation import BatchScheduler, Job, Sampling, ServedModel
from fedpt_app.serving.openai_answers import Answer, respond
from fedpt_app.serving.openai_schema import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    APIError,
    ChatRequest,
    CompletionRequest,
    SamplingFields,
    ServerSettings,
    chat_prompt,
    check_common_fields,
    check_logprobs,
    stop_strings,
)


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

    from fedpt_app.instruct.proxy import LocalLogitsProvider, check_logit_widths
    from fedpt_app.models.loading import load_causal_lm, load_tokenizer
    from fedpt_app.serving.providers import load_logits_provider

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


# ------------------------------------------------------------------------------------- requests against the model


@dataclass
class Service:
    """Request checking against the model and the server's limits, and the rows it hands to the scheduler."""

    model: ServedModel
    settings: ServerSettings
    scheduler: BatchScheduler = field(init=False)

    def __post_init__(self) -> None:
        vocabulary = len(self.model.tokenizer)
        if not 0 <= self.settings.max_logprobs <= vocabulary:
            raise ValueError(f"max-logprobs must be in [0, {vocabulary}] (the vocabulary's size)")
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
        check_logprobs(logprobs, self.settings.max_logprobs)
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
        job = service.start(prompts, samplings, request.stream)
        return await respond(Answer(service.model, job, request, chat=False))

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
        job = service.start([ids], [sampling], request.stream)
        return await respond(Answer(service.model, job, request, chat=True))

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
