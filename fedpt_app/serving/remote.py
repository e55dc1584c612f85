"""The large model as a black box over the network: `LogitsProvider`s for a `fedpt-app serve-logits` service and
for OpenAI-compatible completion endpoints (vLLM, llama.cpp's server, hosted APIs) that return top-k logprobs.

`large-model = "https://host:port"` (or `http://` on loopback) selects the first,
`"openai+https://host/v1#model=NAME&top_k=20&tail=uniform"` (or just `#NAME`) the second; the bearer token comes
from the environment variable `FEDPT_LOGITS_TOKEN`, never from the run config.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import torch
import websockets
from websockets.sync.client import ClientConnection, connect

from fedpt_app.serving.wire import PROTOCOL, TAIL_MODES, decode_logprobs, dense_from_top_k, vocabulary_sha256

TOKEN_VARIABLE = "FEDPT_LOGITS_TOKEN"
OPENAI_SCHEME = "openai+"
TRANSPORTS = ("auto", "http", "websocket")


class RemoteModelError(RuntimeError):
    """A logits service that cannot be reached, refuses us, or answers outside the protocol."""


def checked_url(ref: str) -> str:
    """The service's base URL: https anywhere, plain http only on this machine (a token in clear text otherwise)."""
    url = ref.removeprefix(OPENAI_SCHEME).split("#")[0].rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RemoteModelError(f"{ref!r} is not an http(s) URL")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise RemoteModelError(f"{ref!r}: plain http is allowed on loopback only; use https (serve-logits --tls-*)")
    return url


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_from_environment(ref: str) -> str:
    token = os.environ.get(TOKEN_VARIABLE, "")
    if not token:
        raise RemoteModelError(f"large-model={ref!r} is remote: set {TOKEN_VARIABLE} to the service's bearer token")
    return token


class RemoteSession:
    """A KV cache held by the service: its id and how many positions it holds (`crop` rolls back lazily)."""

    def __init__(self, provider: RemoteLogitsProvider, session_id: str, length: int) -> None:
        self.session_id, self.length = session_id, length
        self.close = weakref.finalize(self, provider.close_session, session_id)
        provider.sessions.add(self)

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)


class RemoteLogitsProvider:
    """`LogitsProvider` over a `fedpt-app serve-logits` service (protocol fedpt-logits/1).

    Session calls (one per decoded token) go over the service's `/v1/stream` WebSocket where it offers one
    (`transport="auto"`): an HTTP request costs about as much as a small model's forward; everything else is HTTP.
    """

    def __init__(
        self,
        ref: str,
        tokenizer,
        *,
        token: str | None = None,
        dtype: str = "float32",
        timeout_s: float = 300,
        transport: str = "auto",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r}: choose one of {', '.join(TRANSPORTS)}")
        self.url = checked_url(ref)
        self.dtype, self.timeout_s = dtype, timeout_s
        self.bytes_sent = self.bytes_received = 0  # what crossed the wire (bodies only), for the benchmarks
        self.headers = {"Authorization": f"Bearer {token or token_from_environment(ref)}"}
        self.client = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout_s)
        info = self._call("GET", "/v1/info")
        if info.get("protocol") != PROTOCOL:
            raise RemoteModelError(f"{self.url} speaks {info.get('protocol')!r}, this client {PROTOCOL!r}")
        if info["vocabulary_sha256"] != vocabulary_sha256(tokenizer) or info["vocab_size"] != len(tokenizer):
            from fedpt_app.instruct.proxy import VocabularyMismatchError

            raise VocabularyMismatchError(
                f"the large model behind {self.url} ({info['model']}, {info['vocab_size']} tokens) does not share "
                f"the small model's tokenizer ({len(tokenizer)} tokens): proxy-tuning needs a same-family pair"
            )
        self.model_name = info["model"]
        self.vocab_size = info["vocab_size"]
        self.end_token_ids = tuple(info["end_token_ids"])
        self._requests = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedpt-logits")
        offered = "websocket" in info.get("transports", ())
        if transport == "websocket" and not offered:
            raise RemoteModelError(f"{self.url} offers no WebSocket transport (an older serve-logits): use http")
        self.transport = "websocket" if offered and transport != "http" else "http"
        self.sessions: weakref.WeakSet[RemoteSession] = weakref.WeakSet()  # the open ones, for `close`
        self._socket: ClientConnection | None = None
        self._socket_lock = threading.Lock()  # one call at a time on the connection: answers come in order

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            response = self.client.request(method, path, json=body)
        except httpx.HTTPError as error:
            raise RemoteModelError(f"{self.url}{path}: {error}") from error
        self.bytes_sent += len(response.request.content)
        self.bytes_received += len(response.content)
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise RemoteModelError(f"{self.url}{path} answered {response.status_code}: {message}")
        return response.json()

    def _session_call(self, op: str, session_id: str, body: dict) -> dict:
        """open/extend a session: over the WebSocket, or as the equivalent HTTP call."""
        if self.transport == "http":
            path = "/v1/sessions" if op == "open" else f"/v1/sessions/{session_id}/extend"
            return self._call("POST", path, body)
        message = json.dumps({"op": op, "session": session_id, "request": body})
        with self._socket_lock:
            try:
                socket = self._socket or self._connect()
                socket.send(message)
                reply = socket.recv(timeout=self.timeout_s)
            except (websockets.exceptions.WebSocketException, OSError, TimeoutError) as error:
                self._disconnect()  # its answers may be out of step now; the service drops its sessions
                raise RemoteModelError(f"{self.url}/v1/stream ({op}): {error!r}") from error
        self.bytes_sent += len(message)
        self.bytes_received += len(reply)
        answer = json.loads(reply)
        if "error" in answer:
            error = answer["error"]
            raise RemoteModelError(f"{self.url}/v1/stream ({op}) answered {error['status']}: {error['message']}")
        return answer

    def _connect(self) -> ClientConnection:
        url = "ws" + self.url.removeprefix("http") + "/v1/stream"
        connection = contextlib.ExitStack()  # websockets' own way to hold a connection open: as a context
        self._socket = connection.enter_context(
            connect(
                url,
                additional_headers=self.headers,
                compression=None,  # log-probabilities barely compress; deflate would cost more than it saves
                max_size=None,  # answers are as large as the service's limits allow
                open_timeout=self.timeout_s,
                ping_interval=None,  # the service pings; a long forward must not look like a dead peer
            )
        )
        self._closer = weakref.finalize(self, connection.close)
        return self._socket

    def _disconnect(self) -> None:
        if self._socket is not None:
            self._closer()
            self._socket = None

    def close(self) -> None:
        """Close this provider's sessions on the service, then its connections."""
        for session in list(self.sessions):
            session.close()
        with self._socket_lock:
            self._disconnect()
        self.client.close()

    def _payload(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **fields: Any) -> dict:
        return {
            "input_ids": input_ids.tolist(),
            "attention_mask": attention_mask.tolist(),
            "dtype": self.dtype,
        } | fields

    def logits(self, input_ids, attention_mask, position_ids, cache=None, use_cache=False, last=0):
        """Position ids are implied by the attention mask (left padding), as the service computes them."""
        if not use_cache:
            answer = self._call("POST", "/v1/logprobs", self._payload(input_ids, attention_mask, last=last))
            return self._rows(answer, input_ids.shape[0]), None
        if cache is None:
            answer = self._session_call("open", "", self._payload(input_ids, attention_mask, last=last))
            return self._rows(answer, input_ids.shape[0]), RemoteSession(self, answer["session"], answer["length"])
        new_mask = attention_mask[:, -input_ids.shape[1] :]  # the service keeps the mask of what it caches
        fields = {"last": last, "past": cache.length}
        answer = self._session_call("extend", cache.session_id, self._payload(input_ids, new_mask, **fields))
        cache.length = answer["length"]
        return self._rows(answer, input_ids.shape[0]), cache

    def submit(self, *args, **kwargs) -> Future:
        """`logits` in a worker thread (one request at a time, in order): the caller runs the small model meanwhile
        (`proxy.requested_logits`)."""
        return self._requests.submit(self.logits, *args, **kwargs)

    def logits_at(self, input_ids, attention_mask, position_ids, mask, top_k=0):
        """Teacher forcing; with `top_k` only each row's k largest log-probabilities and its tail mass cross the wire
        (the other tokens get an equal share of it: `wire.approximate_top_k` of these rows gives them back)."""
        fields = {"select": mask.long().tolist(), "top_k": top_k}
        answer = self._call("POST", "/v1/logprobs", self._payload(input_ids, attention_mask, **fields))
        return decode_logprobs(answer["logprobs"], "uniform")

    def _rows(self, answer: dict, batch: int) -> torch.Tensor:
        return decode_logprobs(answer["logprobs"]).view(batch, -1, self.vocab_size)

    def close_session(self, session_id: str) -> None:
        """Best effort (the service also expires idle sessions): called when a session's cache is dropped."""
        with contextlib.suppress(Exception):  # at interpreter exit, or with the service gone, nothing is left to do
            self.client.delete(f"/v1/sessions/{session_id}")


class OpenAICompletionsProvider:
    """`LogitsProvider` over an OpenAI-compatible `/v1/completions` endpoint that returns top-k `logprobs`.

    An approximation: each position's large-model distribution is known on the returned top-k only; the tail
    mass (1 - their probabilities) is spread evenly over the other tokens (`tail="uniform"`) or dropped. Token
    ids go as the prompt and come back as "token_id:N" (vLLM's `return_tokens_as_token_ids`). No server-side
    cache: each step sends the whole sequence (such servers reuse the shared prefix themselves).
    """

    def __init__(self, ref: str, tokenizer, *, token: str | None = None) -> None:
        self.url = checked_url(ref)
        self.model_name, self.top_k, self.tail = openai_options(ref)
        self.vocab_size = len(tokenizer)
        self.end_token_ids = tuple(sorted({tokenizer.eos_token_id} - {None}))
        self.bytes_sent = self.bytes_received = 0
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token or token_from_environment(ref)}"}, timeout=300
        )

    def next_token_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        """[N, V] approximate log-probabilities of the token after each sequence: one request for all of them."""
        body = {
            "model": self.model_name,
            "prompt": sequences,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": self.top_k,
            "return_tokens_as_token_ids": True,
        }
        try:
            response = self.client.post("/completions", json=body)
        except httpx.HTTPError as error:
            raise RemoteModelError(f"{self.url}/completions: {error}") from error
        self.bytes_sent += len(response.request.content)
        self.bytes_received += len(response.content)
        if response.status_code != 200:
            raise RemoteModelError(f"{self.url}/completions answered {response.status_code}: {response.text[:200]}")
        choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
        return torch.stack([self._dense(choice["logprobs"]["top_logprobs"][0]) for choice in choices])

    def _dense(self, top: dict[str, float]) -> torch.Tensor:
        try:
            ids = torch.tensor([int(token.removeprefix("token_id:")) for token in top])
        except ValueError:
            raise RemoteModelError(
                f"{self.url} returned tokens as text ({next(iter(top))!r}), not as 'token_id:N': it must support "
                "return_tokens_as_token_ids (vLLM, fedpt-app serve)"
            ) from None
        if ids.max() >= self.vocab_size:
            raise RemoteModelError(
                f"{self.url} returned token id {int(ids.max())}, outside the small model's vocabulary"
            )
        values = torch.tensor(list(top.values()), dtype=torch.float32)
        tail = torch.log1p(-values.exp().sum().clamp(max=1.0 - 1e-7))
        return dense_from_top_k(ids, values, tail, self.vocab_size, self.tail)

    def logits(self, input_ids, attention_mask, position_ids, cache=None, use_cache=False, last=0):
        if last != 1:
            raise RemoteModelError("an OpenAI-compatible endpoint gives next-token log-probabilities only (last=1)")
        history = input_ids if cache is None else torch.cat([cache.ids, input_ids], dim=1)
        sequences = [row[mask.bool()].tolist() for row, mask in zip(history, attention_mask, strict=True)]
        rows = self.next_token_logprobs(sequences).unsqueeze(1)
        return rows, (TokenHistory(history) if use_cache else None)

    def logits_at(self, input_ids, attention_mask, position_ids, mask, top_k=0):
        """Teacher forcing as one request of every prefix that ends at a selected position (the endpoint's own
        top-k, whatever `top_k` asks)."""
        sequences = [
            input_ids[row, : column + 1][attention_mask[row, : column + 1].bool()].tolist()
            for row, column in mask.nonzero().tolist()
        ]
        return self.next_token_logprobs(sequences)


def openai_options(ref: str) -> tuple[str, int, str]:
    """(model name, top-k, tail mode) from the reference's fragment: `#NAME` or `#model=NAME&top_k=20&tail=drop`."""
    fragment = ref.partition("#")[2]
    if fragment and "=" not in fragment:
        fragment = f"model={fragment}"
    options = {key: values[-1] for key, values in parse_qs(fragment).items()}
    unknown = set(options) - {"model", "top_k", "tail"}
    if unknown:
        raise RemoteModelError(f"{ref!r}: unknown option(s) {sorted(unknown)} (model, top_k, tail)")
    if not options.get("top_k", "20").isdigit() or int(options.get("top_k", "20")) < 1:
        raise RemoteModelError(f"{ref!r}: top_k must be a positive integer")
    if options.get("tail", "uniform") not in TAIL_MODES:
        raise RemoteModelError(f"{ref!r}: tail must be one of {', '.join(TAIL_MODES)}")
    return options.get("model", ""), int(options.get("top_k", "20")), options.get("tail", "uniform")


class TokenHistory:
    """The client-side "cache" of an endpoint without sessions: the token ids so far (padding included)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def crop(self, length: int) -> None:
        self.ids = self.ids[:, :length]


def remote_provider(ref: str, tokenizer) -> RemoteLogitsProvider | OpenAICompletionsProvider:
    """The provider a remote `large-model` reference names (`openai+...` or a serve-logits URL)."""
    if ref.startswith(OPENAI_SCHEME):
        return OpenAICompletionsProvider(ref, tokenizer)
    return RemoteLogitsProvider(ref, tokenizer)
