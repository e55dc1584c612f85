"""The large model behind `serve-logits`: the wire format, the service's answers against the local provider, its
refusals of bad requests, and the top-k teacher."""

import json
import math
import socket
import subprocess
import time

import httpx
import pytest
import torch
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from fedpt_app.config import ConfigError
from fedpt_app.instruct.decoding import DecodingConfig, crop_cache, decode, positions_of
from fedpt_app.instruct.distill import TeacherCache, response_positions
from fedpt_app.instruct.prompts import collate, tokenize_rows
from fedpt_app.instruct.proxy import VocabularyMismatchError, proxy_step
from fedpt_app.instruct.speculative import speculative_decode
from fedpt_app.models.loading import load_tokenizer
from fedpt_app.serving.background import serve_in_background, service_process
from fedpt_app.serving.logits_service import LogitsEngine, ServiceLimits, create_app
from fedpt_app.serving.openai_api import create_app as create_openai_app
from fedpt_app.serving.openai_api import load_served_model
from fedpt_app.serving.openai_schema import ServerSettings
from fedpt_app.serving.remote import (
    OpenAICompletionsProvider,
    RemoteLogitsProvider,
    RemoteModelError,
    checked_url,
    openai_options,
    token_from_environment,
)
from fedpt_app.serving.wire import approximate_top_k, decode_logprobs, dense_from_top_k, encode_logprobs
from fedpt_app.tools import cli
from fedpt_app.tools.preflight import preflight
from fedpt_app.tools.simulation import validate_overrides
from tests.conftest import build_tokenizer

TOKEN = "test-token-0123456789abcdef"
PROMPTS = [
    "### Instruction:\nwhat is the capital of peru?\n\n### Response:\n",
    "### Instruction:\nis 7 even or odd?\n\n### Response:\n",
    "### Instruction:\nhow many letters are in abc?\n\n### Response:\n",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def service(tiny_large_dir, large):
    """A real uvicorn server on loopback, in a thread of this process, serving the tiny large model."""
    limits = ServiceLimits(max_batch=4, max_positions=200, max_sessions=3, session_ttl_s=60.0, max_body_bytes=200_000)
    engine = LogitsEngine(large, load_tokenizer(str(tiny_large_dir)), str(tiny_large_dir), limits)
    with serve_in_background(create_app(engine, TOKEN)) as url:
        yield url, engine


@pytest.fixture
def remote(service, tiny_model_dir):
    provider = RemoteLogitsProvider(service[0], load_tokenizer(str(tiny_model_dir)), token=TOKEN)
    yield provider
    provider.close()


def encoded(tokenizer, prompts):
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


# ---- the wire format ------------------------------------------------------------------------------------------
def test_top_k_payload_keeps_the_k_largest_and_the_tail_mass_hand_computed():
    logprobs = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.3)]])
    payload = encode_logprobs(logprobs, top_k=2, dtype="float32")
    dropped = decode_logprobs(payload, "drop")
    assert dropped[0, 1] == -math.inf
    assert torch.allclose(dropped[0, [0, 2]], logprobs[0, [0, 2]])
    # uniform: the tail mass 0.2 spread over the one token not sent gives back its exact log-probability
    assert torch.allclose(decode_logprobs(payload, "uniform"), logprobs, atol=1e-6)
    spread = dense_from_top_k(
        torch.tensor([[0]]), torch.tensor([[math.log(0.6)]]), torch.tensor([math.log(0.4)]), 5, "uniform"
    )
    assert torch.allclose(spread.exp(), torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]]))


def test_dense_payloads_round_trip_exactly_in_float32_and_closely_in_float16():
    rows = torch.log_softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.equal(decode_logprobs(encode_logprobs(rows, 0, "float32")), rows)
    assert torch.allclose(decode_logprobs(encode_logprobs(rows, 0, "float16")), rows, atol=1e-2)


def test_remote_references_need_https_off_loopback_and_a_token(monkeypatch):
    assert checked_url("http://127.0.0.1:8765/") == "http://127.0.0.1:8765"
    assert checked_url("https://logits.example.org") == "https://logits.example.org"
    with pytest.raises(RemoteModelError, match="plain http is allowed on loopback only"):
        checked_url("http://10.0.0.5:8765")
    monkeypatch.delenv("FEDPT_LOGITS_TOKEN", raising=False)
    with pytest.raises(RemoteModelError, match="set FEDPT_LOGITS_TOKEN"):
        token_from_environment("https://logits.example.org")
    with pytest.raises(ValueError, match="choose one of auto, http, websocket"):
        RemoteLogitsProvider("http://127.0.0.1:9", None, token="t", transport="udp")


def test_openai_references_carry_the_model_top_k_and_tail_in_the_fragment():
    assert openai_options("openai+https://h/v1#qwen") == ("qwen", 20, "uniform")
    assert openai_options("openai+https://h/v1#model=q&top_k=5&tail=drop") == ("q", 5, "drop")
    with pytest.raises(RemoteModelError, match="unknown option"):
        openai_options("openai+https://h/v1#model=q&topk=5")
    with pytest.raises(RemoteModelError, match="top_k must be a positive integer"):
        openai_options("openai+https://h/v1#model=q&top_k=0")


def test_a_remote_large_model_is_refused_where_weights_are_needed_and_without_a_token(monkeypatch):
    url = "large-model='https://logits.example.org'"
    with pytest.raises(ConfigError, match="fedavg-large tunes the large model's weights"):
        validate_overrides(f"algorithm='fedavg-large' {url}")
    with pytest.raises(ConfigError, match="its quantization is the service's"):
        validate_overrides(f"{url} large-model-quantization='4bit'")
    monkeypatch.delenv("FEDPT_LOGITS_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="set FEDPT_LOGITS_TOKEN"):
        preflight(validate_overrides(url))
    with pytest.raises(ConfigError, match="plain http is allowed on loopback only"):
        preflight(validate_overrides("large-model='http://10.1.2.3:8765'"))


# ---- the service against the local provider ------------------------------------------------------------------
def test_stateless_and_teacher_forcing_answers_equal_the_local_provider(remote, large, tiny_tokenizer):
    ids, mask = encoded(tiny_tokenizer, PROMPTS)
    positions = positions_of(mask)
    assert torch.equal(remote.logits(ids, mask, positions, last=1)[0], large.logits(ids, mask, positions, last=1)[0])
    select = mask.clone().bool()
    select[:, :-3] = False
    assert torch.equal(remote.logits_at(ids, mask, positions, select), large.logits_at(ids, mask, positions, select))


@pytest.mark.parametrize("transport", ["websocket", "http"])
def test_a_session_keeps_the_kv_cache_and_rolls_back_like_the_local_cache(transport, large, tiny_tokenizer, service):
    remote = RemoteLogitsProvider(service[0], tiny_tokenizer, token=TOKEN, transport=transport)
    assert remote.transport == transport
    ids, mask = encoded(tiny_tokenizer, PROMPTS[:2])
    steps = torch.tensor([[5, 6], [7, 8], [9, 10]])  # three steps of one new token per row
    results = {}
    for name, provider in (("remote", remote), ("local", large)):
        rows, cache = provider.logits(ids, mask, positions_of(mask), None, True, last=1)
        outputs, full_mask = [rows], mask
        for step in steps:
            full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            rows, cache = provider.logits(step[:, None], full_mask, positions_of(full_mask)[:, -1:], cache, True, 1)
            outputs.append(rows)
        crop_cache(cache, ids.shape[1] + 1)  # roll back the last two steps, then redo them as one 2-token extension
        rows, cache = provider.logits(steps[1:].T, full_mask, positions_of(full_mask)[:, -2:], cache, True, 2)
        results[name] = (torch.cat(outputs, dim=1), rows)
    assert torch.equal(results["remote"][0], results["local"][0])
    assert torch.allclose(results["remote"][1], results["local"][1], atol=1e-5)
    assert torch.allclose(results["remote"][1], results["remote"][0][:, 2:], atol=1e-5)
    remote.close()  # the service drops the sessions of a closed stream
    assert wait_for(lambda: not service[1].sessions)


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_proxy_decoding_through_the_service_equals_the_local_run(remote, large, tuned_small, tiny_tokenizer):
    config = DecodingConfig(max_new_tokens=12)
    local = decode(proxy_step(large, tuned_small, 1.0), tiny_tokenizer, PROMPTS, config)
    assert decode(proxy_step(remote, tuned_small, 1.0), tiny_tokenizer, PROMPTS, config) == local


def test_speculative_decoding_through_the_service_equals_plain_local_decoding(
    remote, large, tuned_small, tiny_tokenizer
):
    """The service's session is extended by several drafts at once and rolled back (`past`) while this process
    runs the small model (`submit`): the answers still equal plain proxy decoding on the local model."""
    config = DecodingConfig(max_new_tokens=12)
    local = decode(proxy_step(large, tuned_small, 1.0), tiny_tokenizer, PROMPTS[:1], config)
    remote_answers, stats = speculative_decode(remote, tuned_small, tiny_tokenizer, PROMPTS[:1], config, draft_tokens=3)
    assert remote_answers == local
    assert stats.target_forwards < 12


def test_a_service_with_another_tokenizer_is_refused(service, tmp_path):
    other = build_tokenizer(vocab_size=300)
    with pytest.raises(VocabularyMismatchError, match="does not share the small model's tokenizer"):
        RemoteLogitsProvider(service[0], other, token=TOKEN)


def test_an_openai_compatible_endpoints_top_k_gives_the_proxy_over_the_full_vocabulary(
    large, tuned_small, tiny_tokenizer, tiny_large_dir
):
    """`large-model='openai+http://…'` against `fedpt-app serve --model large` (a real server): with k = the whole
    vocabulary the proxy decodes exactly as with full log-probabilities; with k = 5 the other tokens share the tail."""
    served = load_served_model("large", "", str(tiny_large_dir), "")
    app = create_openai_app(served, ServerSettings(max_logprobs=len(tiny_tokenizer)))
    config = DecodingConfig(max_new_tokens=8)
    expected = decode(proxy_step(large, tuned_small, 1.0), tiny_tokenizer, PROMPTS, config)
    with serve_in_background(app) as url:
        ref = f"openai+{url}/v1#model={served.name}&top_k={len(tiny_tokenizer)}"
        everything = OpenAICompletionsProvider(ref, tiny_tokenizer, token="unused")
        assert decode(proxy_step(everything, tuned_small, 1.0), tiny_tokenizer, PROMPTS, config) == expected
        few = OpenAICompletionsProvider(f"openai+{url}/v1#model={served.name}&top_k=5", tiny_tokenizer, token="x")
        ids, mask = encoded(tiny_tokenizer, PROMPTS)
        rows = few.logits(ids, mask, positions_of(mask), last=1)[0][:, -1]
    full = large.logits(ids, mask, positions_of(mask), last=1)[0][:, -1]
    top = full.topk(5, dim=-1).indices
    assert torch.allclose(rows.gather(-1, top), full.gather(-1, top), atol=1e-4)
    tail = torch.log1p(-full.gather(-1, top).exp().sum(-1)) - math.log(len(tiny_tokenizer) - 5)
    others = torch.ones_like(rows, dtype=torch.bool).scatter(-1, top, False)
    assert torch.allclose(
        rows[others].view(len(PROMPTS), -1), tail[:, None].expand(-1, len(tiny_tokenizer) - 5), atol=1e-4
    )


# ---- refusals -------------------------------------------------------------------------------------------------
def post(url: str, path: str, body=None, token: str = TOKEN, content: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if content is not None:
        return httpx.post(url + path, content=content, headers=headers | {"content-type": "application/json"})
    return httpx.post(url + path, json=body, headers=headers)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"input_ids": [[1, 2, 99999]]}, 400, "token ids must be in"),
        ({"input_ids": [[1, 2], [3]]}, 400, "rectangular"),
        ({"input_ids": []}, 400, "non-empty"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1]]}, 400, "attention_mask must be 1 x 2"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1, 2]]}, 400, "0 and 1 only"),
        ({"input_ids": [[1, 2]], "last": 3}, 400, "last must be in"),
        ({"input_ids": [[1, 2]], "top_k": -1}, 400, "top_k must be in"),
        ({"input_ids": [[1, 2]], "colour": "red"}, 400, "colour"),
        ({"input_ids": [["a"]]}, 400, "malformed request"),
        ({"input_ids": [[1]] * 5}, 413, "the limit is 4"),
        ({"input_ids": [[1] * 201]}, 413, "positions per sequence"),
        ({"input_ids": [[1, 2]], "select": [[1]]}, 400, "select must be"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(service, body, status, message):
    response = post(service[0], "/v1/logprobs", body)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]


def test_auth_body_size_sessions_and_their_limits(service, tiny_tokenizer):
    url, engine = service
    assert post(url, "/v1/logprobs", {"input_ids": [[1]]}, token="wrong").status_code == 401
    assert httpx.get(url + "/v1/info").status_code == 401
    assert post(url, "/v1/logprobs", content=b"{not json").status_code == 400
    assert post(url, "/v1/logprobs", content=b" " * 300_000).status_code == 413
    assert post(url, "/v1/sessions/nope/extend", {"input_ids": [[1]]}).status_code == 404
    opened = [post(url, "/v1/sessions", {"input_ids": [[1, 2]]}) for _ in range(3)]
    assert all(response.status_code == 200 for response in opened)
    refused = post(url, "/v1/sessions", {"input_ids": [[1, 2]]})
    assert refused.status_code == 429 and "sessions open" in refused.json()["error"]["message"]
    session = opened[0].json()["session"]
    wrong_batch = post(url, f"/v1/sessions/{session}/extend", {"input_ids": [[3], [4]]})
    assert wrong_batch.status_code == 400
    too_far = post(url, f"/v1/sessions/{session}/extend", {"input_ids": [[3]], "past": 5})
    assert too_far.status_code == 400 and "past must be in [0, 2]" in too_far.json()["error"]["message"]
    # the bad requests left the session as it was: extending it still answers as a fresh 3-token forward
    extended = post(url, f"/v1/sessions/{session}/extend", {"input_ids": [[3]]}).json()
    fresh = post(url, "/v1/logprobs", {"input_ids": [[1, 2, 3]]}).json()
    assert extended["length"] == 3
    assert torch.allclose(decode_logprobs(extended["logprobs"]), decode_logprobs(fresh["logprobs"]), atol=1e-5)
    for response in opened:
        assert (
            httpx.delete(
                f"{url}/v1/sessions/{response.json()['session']}", headers={"Authorization": f"Bearer {TOKEN}"}
            ).status_code
            == 200
        )
    assert engine.sessions == {}


def test_the_session_stream_answers_bad_messages_in_line_and_keeps_the_connection(service, tiny_tokenizer):
    """`/v1/stream`: an error is an answer on the connection, which stays usable; sessions are the HTTP calls'."""
    url, engine = service
    stream_url = "ws" + url.removeprefix("http") + "/v1/stream"
    with pytest.raises(InvalidStatus, match="403"):
        connect(stream_url, additional_headers={"Authorization": "Bearer wrong"}).close()
    with connect(stream_url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as stream:

        def call(message) -> dict:
            stream.send(message if isinstance(message, str) else json.dumps(message))
            return json.loads(stream.recv(timeout=30))

        opened = call({"op": "open", "request": {"input_ids": [[1, 2]]}})
        session = opened["session"]
        refusals = [
            ("{not json", 400, "malformed request"),
            ({"op": "fork", "session": session}, 400, "op"),
            ({"op": "extend", "request": {"input_ids": [[3]]}}, 400, "needs the session's id"),
            ({"op": "extend", "session": "nope", "request": {"input_ids": [[3]]}}, 404, "no session 'nope'"),
            ({"op": "extend", "session": session, "request": {"input_ids": [[99999]]}}, 400, "token ids must be in"),
            ({"op": "extend", "session": session, "request": {"input_ids": [[3]], "past": 5}}, 400, "past must be"),
            ({"op": "open", "request": {"input_ids": [[1]], "colour": "red"}}, 400, "colour"),
            ({"op": "open", "request": {"input_ids": [[1]] * 5}}, 413, "the limit is 4"),
            (" " * 300_000, 413, "request body over"),
        ]
        for message, status, text in refusals:
            answer = call(message)
            assert answer["error"]["status"] == status and text in answer["error"]["message"], (message, answer)
        extended = call({"op": "extend", "session": session, "request": {"input_ids": [[3]]}})
        fresh = post(url, "/v1/logprobs", {"input_ids": [[1, 2, 3]]}).json()
        assert extended["length"] == 3  # the refusals left the session as it was
        assert torch.allclose(decode_logprobs(extended["logprobs"]), decode_logprobs(fresh["logprobs"]), atol=1e-5)
        assert call({"op": "close", "session": session}) == {"closed": session}
        assert call({"op": "open", "request": {"input_ids": [[1, 2]]}})["length"] == 2
        assert len(engine.sessions) == 1
    assert wait_for(lambda: not engine.sessions)  # closing the connection closed its session


# ---- the top-k teacher ----------------------------------------------------------------------------------------
def test_a_top_k_teacher_cache_over_the_wire_holds_the_large_models_top_k(
    remote, large, tuned_small, tiny_tokenizer, tmp_path
):
    rows = [{"instruction": "is 7 even or odd?", "context": "", "response": "the answer is odd."}] * 3
    examples, _ = tokenize_rows(tiny_tokenizer, rows, 64, 48)
    pad = tiny_tokenizer.pad_token_id
    sent = remote.bytes_received
    top = TeacherCache(examples, remote, tuned_small, 1.0, pad, "memory", 100.0, tmp_path, top_k=5, tail="drop")
    positions = int(top.offsets[-1])
    assert remote.bytes_received - sent < positions * len(tiny_tokenizer)  # far less than dense float32 rows
    batch = collate(examples, pad)
    mask = response_positions(batch["labels"])
    full = large.logits_at(batch["input_ids"], batch["attention_mask"], positions_of(batch["attention_mask"]), mask)
    expected = approximate_top_k(full, 5, "drop")
    torch.testing.assert_close(top.rows([0, 1, 2]), expected, atol=5e-3, rtol=1e-3)  # float16 values


def test_serve_logits_over_tls_as_its_owner_starts_it(
    tmp_path, tiny_large_dir, tiny_model_dir, large, monkeypatch, capsys
):
    """The command itself, in its own process, with the demo CA's certificate: https works and answers as the local
    model does; plain http off loopback and a short token are refused before the model loads."""
    subprocess.run(
        ["bash", "scripts/make-certificates.sh", str(tmp_path / "tls"), "1"], check=True, capture_output=True
    )
    (tmp_path / "token").write_text("tls-token-0123456789abcdef\n")
    port = free_port()
    command = ["fedpt-app", "serve-logits", "--model", str(tiny_large_dir), "--port", str(port)]
    command += ["--token-file", str(tmp_path / "token")]
    tls = [
        "--tls-certfile",
        str(tmp_path / "tls" / "superlink.crt"),
        "--tls-keyfile",
        str(tmp_path / "tls" / "superlink.key"),
    ]
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "tls" / "ca.crt"))  # the client trusts the demo CA
    with service_process(command + tls, f"https://127.0.0.1:{port}", ready_path="/healthz", timeout_s=120) as url:
        remote = RemoteLogitsProvider(url, load_tokenizer(str(tiny_model_dir)), token="tls-token-0123456789abcdef")
        ids, mask = encoded(load_tokenizer(str(tiny_model_dir)), PROMPTS)
        positions = positions_of(mask)
        assert torch.equal(
            remote.logits(ids, mask, positions, last=1)[0], large.logits(ids, mask, positions, last=1)[0]
        )
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert cli.main(command[1:] + ["--host", "0.0.0.0"]) == 2
    assert "in clear text" in capsys.readouterr().err
    (tmp_path / "short").write_text("short\n")
    assert cli.main(["serve-logits", "--model", str(tiny_large_dir), "--token-file", str(tmp_path / "short")]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
