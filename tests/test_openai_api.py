"""`fedpt-app serve`: a real uvicorn server on loopback, called with the official `openai` client as a user would.

Greedy answers (alone, in lists, or batched with concurrent requests) equal `decode` run alone on the prompt;
streamed chunks add up to the non-streamed text; log-probabilities are the proxy's; bad requests get OpenAI-style
4xx errors without disturbing requests in flight.
"""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
import torch

from fedpt_app.instruct.decoding import DecodingConfig, decode, positions_of
from fedpt_app.instruct.prompts import build_prompt
from fedpt_app.models.lora import LoraSpec, adapter_state, load_adapter_state, lora_model
from fedpt_app.serving.background import serve_in_background
from fedpt_app.serving.batched_generation import Row, Sampling, generate_rows, visible_text
from fedpt_app.serving.openai_api import create_app, load_served_model
from fedpt_app.serving.openai_schema import ServerSettings

KEY = "test-key-123"
PROMPTS = [
    build_prompt("What is the capital of Peru?"),
    build_prompt("Is 7 even or odd?"),
    build_prompt("Count the letters in 'abc'.", "Letters: a, b, c"),
    build_prompt("Name a color."),
]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A random (non-zero) adapter on the tiny small, saved as a run saves it."""
    model = lora_model(str(tiny_model_dir), LoraSpec(4, 8.0, target_modules=("q_proj", "v_proj")), seed=0)
    generator = torch.Generator().manual_seed(3)
    state = {key: torch.randn(value.shape, generator=generator) * 0.5 for key, value in adapter_state(model).items()}
    load_adapter_state(model, state)
    folder = tmp_path_factory.mktemp("served-adapter")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(tiny_model_dir, tiny_large_dir, adapter_dir):
    return load_served_model("proxy", str(tiny_model_dir), str(tiny_large_dir), str(adapter_dir))


@pytest.fixture(scope="module")
def server(served):
    settings = ServerSettings(max_batch=8, batch_wait_ms=50, max_tokens_limit=64, api_key=KEY)
    app = create_app(served, settings)
    with serve_in_background(app) as root:
        base_url = f"{root}/v1"
        yield app, base_url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1], api_key=KEY, max_retries=0, timeout=60)


def reference(served, prompt: str, max_tokens: int, stop=("###",)) -> str:
    """`decode` alone on one prompt with the served model's step (run only while the server is idle: the two
    would share the small model's forward hooks)."""
    config = DecodingConfig(max_new_tokens=max_tokens, stop_strings=stop, end_token_ids=tuple(served.end_ids))
    return decode(served.new_step(), served.tokenizer, [prompt], config)[0]


def complete(client, prompt, max_tokens=12, **extra):
    return client.completions.create(
        model="fedpt-proxy", prompt=prompt, max_tokens=max_tokens, temperature=0, stop=["###"], **extra
    )


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list().data] == ["fedpt-proxy"]


def test_greedy_completions_equal_decode_alone(client, served):
    for prompt in PROMPTS:
        answer = complete(client, prompt)
        choice = answer.choices[0]
        assert choice.text.strip() == reference(served, prompt, 12)
        assert choice.finish_reason in ("stop", "length")
        assert answer.usage.prompt_tokens == len(served.tokenizer(prompt)["input_ids"])
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert any(complete(client, prompt).choices[0].text.strip() for prompt in PROMPTS)  # the models say something


def test_prompt_lists_and_token_ids_answer_like_single_prompts(client, served):
    singles = [complete(client, prompt).choices[0].text for prompt in PROMPTS[:2]]
    listed = complete(client, PROMPTS[:2]).choices
    assert [choice.index for choice in listed] == [0, 1] and [choice.text for choice in listed] == singles
    ids = served.tokenizer(PROMPTS[0])["input_ids"]
    assert complete(client, ids).choices[0].text == singles[0]
    assert complete(client, [ids, served.tokenizer(PROMPTS[1])["input_ids"]]).choices[1].text == singles[1]


def test_max_tokens_cuts_with_finish_reason_length(client):
    answer = client.completions.create(model="fedpt-proxy", prompt="The", max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3


def test_chat_uses_the_prompt_template(client, served):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Is 7 even or odd?"},
    ]
    answer = client.chat.completions.create(model="fedpt-proxy", messages=messages, max_tokens=12, temperature=0)
    prompt = build_prompt("Is 7 even or odd?", "System: Answer briefly.")
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content.strip() == reference(served, prompt, 12)
    assert answer.usage.prompt_tokens == len(served.tokenizer(prompt)["input_ids"])


def test_streamed_chunks_add_up_to_the_answer(client, server):
    for prompt in PROMPTS[:2]:
        whole = complete(client, prompt, max_tokens=16)
        chunks = list(complete(client, prompt, max_tokens=16, stream=True))
        assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    messages = [{"role": "user", "content": "Name a color."}]
    whole = client.chat.completions.create(model="fedpt-proxy", messages=messages, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="fedpt-proxy",
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    body = {"model": "fedpt-proxy", "prompt": PROMPTS[0], "max_tokens": 4, "stream": True}
    raw = httpx.post(f"{server[1]}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_logprobs_are_the_proxys_and_top1_is_the_greedy_token(client, served):
    answer = client.completions.create(
        model="fedpt-proxy",
        prompt=PROMPTS[0],
        max_tokens=8,
        temperature=0,
        logprobs=5,
        extra_body={"return_tokens_as_token_ids": True},
    )
    logprobs, usage = answer.choices[0].logprobs, answer.usage
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert len(logprobs.tokens) == usage.completion_tokens
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert token.startswith("token_id:") and len(top) == 5  # greedy: the chosen token is in the top 5
        assert max(top, key=top.get) == token and top[token] == pytest.approx(logprob)
    ids = [int(token.removeprefix("token_id:")) for token in logprobs.tokens]
    assert served.tokenizer.decode(ids, skip_special_tokens=True).startswith(answer.choices[0].text)
    prompt_ids = torch.tensor([served.tokenizer(PROMPTS[0])["input_ids"]])
    mask = torch.ones_like(prompt_ids)
    first = torch.log_softmax(served.new_step()(prompt_ids, mask, positions_of(mask))[0], -1)
    values, top_ids = first.topk(5)
    expected = {f"token_id:{i}": v for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)}
    assert logprobs.top_logprobs[0] == pytest.approx(expected, abs=1e-4)


def test_chat_logprobs_in_openai_shape(client):
    answer = client.chat.completions.create(
        model="fedpt-proxy",
        messages=[{"role": "user", "content": "Name a color."}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(len(item.top_logprobs) == 3 and item.top_logprobs[0].token == item.token for item in content)


def test_concurrent_requests_are_batched_and_answer_like_sequential_ones(client, server):
    requests = [
        {"prompt": PROMPTS[i % 4], "max_tokens": 6 + 2 * i, "temperature": 0.8 if i == 5 else 0, "seed": 7}
        for i in range(6)
    ]

    def ask(request: dict) -> str:
        return client.completions.create(model="fedpt-proxy", stop=["###"], **request).choices[0].text

    sequential = [ask(request) for request in requests]
    scheduler = server[0].state.service.scheduler
    before = len(scheduler.batch_sizes)
    results: list[str | None] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def worker(index: int) -> None:
        start.wait()
        results[index] = ask(requests[index])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == sequential
    assert max(scheduler.batch_sizes[before:]) > 1  # at least some requests shared a decode batch


def test_bad_requests_get_openai_errors_and_leave_others_alone(client, server, served):
    in_flight: dict[str, str] = {}
    expected = complete(client, PROMPTS[2], max_tokens=40).choices[0].text
    worker = threading.Thread(
        target=lambda: in_flight.update(text=complete(client, PROMPTS[2], max_tokens=40).choices[0].text)
    )
    worker.start()
    bad_completions = [
        ({"model": "gpt-4"}, openai.NotFoundError, "model"),
        ({"prompt": ""}, openai.BadRequestError, "prompt"),
        ({"prompt": []}, openai.BadRequestError, "prompt"),
        ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
        ({"max_tokens": 65}, openai.BadRequestError, "max_tokens"),
        ({"n": 2}, openai.BadRequestError, "n"),
        ({"temperature": 2.5}, openai.BadRequestError, "temperature"),
        ({"top_p": 0.0}, openai.BadRequestError, "top_p"),
        ({"logprobs": 21}, openai.BadRequestError, "logprobs"),
        ({"prompt": "word " * 300}, openai.BadRequestError, "prompt"),  # the tiny models' context is 256
        ({"prompt": [10**6]}, openai.BadRequestError, "prompt"),
    ]
    for change, error_type, param in bad_completions:
        request = {"model": "fedpt-proxy", "prompt": "Hello", "max_tokens": 4} | change
        with pytest.raises(error_type) as caught:
            client.completions.create(**request)
        assert caught.value.body["param"] == param, caught.value.body
    with pytest.raises(openai.BadRequestError, match="last message must be the user's"):
        client.chat.completions.create(model="fedpt-proxy", messages=[{"role": "assistant", "content": "Hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[1], api_key="wrong", max_retries=0).models.list()
    missing_key = httpx.get(f"{server[1]}/models", timeout=10)
    assert missing_key.status_code == 401
    assert set(missing_key.json()["error"]) == {"message", "type", "param", "code"}
    assert missing_key.json()["error"]["code"] == "invalid_api_key"
    malformed = httpx.post(
        f"{server[1]}/completions", json={"model": "fedpt-proxy"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "prompt"
    worker.join(60)
    assert in_flight["text"] == expected


def test_a_client_leaving_mid_stream_frees_its_row(client, server):
    body = {"model": "fedpt-proxy", "prompt": PROMPTS[1], "max_tokens": 64, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server[1]}/completions", json=body, headers=headers, timeout=60) as response:
        first = next(response.iter_lines())
    assert first.startswith("data: {")
    assert complete(client, PROMPTS[0]).choices[0].text == complete(client, PROMPTS[0]).choices[0].text


def test_a_failing_batch_answers_500_and_the_server_carries_on(client, server, monkeypatch):
    service = server[0].state.service

    def broken_step():
        raise RuntimeError("out of memory")

    monkeypatch.setattr(service.model, "new_step", broken_step)
    with pytest.raises(openai.InternalServerError, match="out of memory"):
        complete(client, PROMPTS[0])
    monkeypatch.undo()
    assert complete(client, PROMPTS[0]).choices[0].finish_reason in ("stop", "length")


def rows_text(served, prompts: list[str], max_tokens: int) -> list[str]:
    rows = [
        Row(i, served.tokenizer(p)["input_ids"], Sampling(max_tokens, stop=("###",)), lambda _: None, False)
        for i, p in enumerate(prompts)
    ]
    generate_rows(served, rows)
    return [row.text.strip() for row in rows]


@pytest.mark.parametrize("mode", ["small", "large"])
def test_small_and_large_modes_batch_like_decode_alone(mode, tiny_model_dir, tiny_large_dir, adapter_dir):
    served = load_served_model(mode, str(tiny_model_dir), str(tiny_large_dir), str(adapter_dir))
    assert served.name == f"fedpt-{mode}"
    assert rows_text(served, PROMPTS, 10) == [reference(served, prompt, 10) for prompt in PROMPTS]


def test_visible_text_holds_back_a_possible_stop_start():
    assert visible_text("answer #", ("###",)) == "answer "
    assert visible_text("answer ##", ("###",)) == "answer "
    assert visible_text("answer", ("###",)) == "answer"
    assert visible_text("caf\ufffd", ()) == "caf"


def test_serve_command_loads_the_model_and_starts_uvicorn(monkeypatch, tmp_path, tiny_large_dir):
    import uvicorn

    from fedpt_app.tools import cli

    started: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    (tmp_path / "key").write_text(f"{KEY}\n")
    argv = ["serve", "--model", "large", "--large", str(tiny_large_dir), "--port", "8123"]
    assert cli.main(argv + ["--api-key-file", str(tmp_path / "key")]) == 0
    assert started["port"] == 8123 and started["app"].state.service.settings.api_key == KEY
    assert started["app"].state.service.model.name == "fedpt-large"
    assert cli.main(["serve", "--model", "large"]) == 2  # no large model given


def test_max_logprobs_is_the_operators_limit(monkeypatch, tiny_large_dir):
    """`serve --max-logprobs 100`: 100 alternatives per token (completions and chat), 101 a 400 naming the limit;
    a limit over the vocabulary is refused at start."""
    import uvicorn

    from fedpt_app.tools import cli

    started: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(app=app))
    argv = ["serve", "--model", "large", "--large", str(tiny_large_dir)]
    assert cli.main(argv + ["--max-logprobs", "100"]) == 0
    assert started["app"].state.service.settings.max_logprobs == 100
    with serve_in_background(started["app"]) as root:
        base_url = f"{root}/v1"
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        request = {"model": "fedpt-large", "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}
        as_ids = {"return_tokens_as_token_ids": True}  # distinct keys even where two tokens decode alike
        with pytest.raises(openai.BadRequestError, match=r"\[0, 100\]") as caught:
            client.completions.create(**request, logprobs=101)
        assert caught.value.body["param"] == "logprobs"
        logprobs = client.completions.create(**request, logprobs=100, extra_body=as_ids).choices[0].logprobs
        assert logprobs.tokens and [len(top) for top in logprobs.top_logprobs] == [100] * len(logprobs.tokens)
        chat = client.chat.completions.create(
            model="fedpt-large",
            messages=[{"role": "user", "content": "Name a color."}],
            max_tokens=3,
            temperature=0,
            logprobs=True,
            top_logprobs=100,
        )
        assert chat.choices[0].logprobs.content
        assert all(len(item.top_logprobs) == 100 for item in chat.choices[0].logprobs.content)
    assert cli.main(argv + ["--max-logprobs", "401"]) == 2  # the tiny vocabulary has 400 tokens
