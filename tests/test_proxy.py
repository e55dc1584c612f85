"""Proxy-tuning: the logit arithmetic, the tokenizer check, and fast decoding equal to the naive loop."""

import pytest
import torch

from fedpt_app.instruct.decoding import DecodingConfig, decode, model_step, pick_next
from fedpt_app.instruct.proxy import (
    LocalLogitsProvider,
    VocabularyMismatchError,
    check_logit_widths,
    naive_proxy_step,
    proxy_logits,
    proxy_step,
    shared_vocab_size,
    small_offset,
)
from fedpt_app.models.loading import load_tokenizer
from tests.conftest import build_tokenizer, save_tiny_llama

PROMPTS = [
    "### Instruction:\nWhat is the capital of Peru?\n\n### Response:\n",
    "### Instruction:\nIs 7 even or odd?\n\n### Response:\n",
    "### Instruction:\nCount the letters in 'abc'.\n\n### Response:\n",
]


def test_proxy_logits_add_the_small_models_offset():
    large = torch.tensor([1.0, 2.0, 3.0])
    tuned, base = torch.tensor([0.5, 0.0, -1.0]), torch.tensor([0.0, 1.0, -1.0])
    assert torch.equal(proxy_logits(large, tuned, base, 1.0), torch.tensor([1.5, 1.0, 3.0]))
    assert torch.equal(proxy_logits(large, tuned, base, 2.0), torch.tensor([2.0, 0.0, 3.0]))
    assert torch.equal(proxy_logits(large, tuned, base, 0.0), large)


def test_logit_widths_with_padding_rows_are_truncated_to_the_vocabulary():
    assert check_logit_widths(100, {"small": 100, "large": 128}) == 100
    with pytest.raises(VocabularyMismatchError, match="'large' has 90 logit rows"):
        check_logit_widths(100, {"small": 100, "large": 90})


def test_same_tokenizer_pair_shares_its_vocabulary(tiny_model_dir, tiny_large_dir, tiny_tokenizer):
    assert shared_vocab_size(str(tiny_model_dir), str(tiny_large_dir)) == len(tiny_tokenizer)


def test_padded_large_model_is_truncated_to_the_shared_vocabulary(tmp_path, tiny_model_dir, tiny_tokenizer):
    padded = save_tiny_llama(tmp_path / "padded", tiny_tokenizer, hidden=32)
    config_path = padded / "config.json"
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(padded)
    config.vocab_size = len(tiny_tokenizer) + 16  # Qwen-style padding rows
    LlamaForCausalLM(config).save_pretrained(padded)
    assert config_path.exists()
    width = shared_vocab_size(str(tiny_model_dir), str(padded))
    provider = LocalLogitsProvider(str(padded), width)
    ids = torch.tensor([[1, 5, 7]])
    logits, _ = provider.logits(ids, torch.ones_like(ids), torch.arange(3)[None])
    assert width == len(tiny_tokenizer) and logits.shape[-1] == len(tiny_tokenizer)


def test_different_tokenizers_are_refused_naming_both_models(tmp_path, tiny_model_dir):
    other = save_tiny_llama(tmp_path / "other", build_tokenizer(vocab_size=350))
    with pytest.raises(VocabularyMismatchError) as error:
        shared_vocab_size(str(tiny_model_dir), str(other))
    assert str(tiny_model_dir) in str(error.value) and str(other) in str(error.value)


def test_merged_forward_equals_separate_tuned_and_base_forwards(tuned_small, tiny_tokenizer):
    encoded = tiny_tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    mask = encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    offset, _ = small_offset(tuned_small, len(tiny_tokenizer), encoded["input_ids"], mask, positions)
    with torch.no_grad():
        tuned = tuned_small(**encoded, position_ids=positions).logits
        with tuned_small.disable_adapter():
            base = tuned_small(**encoded, position_ids=positions).logits
    assert (tuned - base).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(offset, tuned - base, atol=1e-5, rtol=1e-4)


def test_kv_cached_merged_decoding_equals_the_naive_three_model_loop(tuned_small, large, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    config = DecodingConfig(max_new_tokens=24, stop_strings=())
    fast = decode(proxy_step(large, tuned_small, 1.0), tokenizer, PROMPTS, config)
    naive = decode(naive_proxy_step(large, tuned_small, 1.0), tokenizer, PROMPTS, config)
    assert fast == naive
    assert any(len(text) > 0 for text in fast)


def test_single_model_decoding_matches_transformers_generate(tuned_small, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.padding_side = "left"
    config = DecodingConfig(max_new_tokens=12, stop_strings=())
    ours = decode(model_step(tuned_small, len(tokenizer)), tokenizer, PROMPTS, config)
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = tuned_small.generate(
            **encoded,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    theirs = [
        text.strip()
        for text in tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    ]
    assert ours == theirs


def test_decoding_stops_at_a_stop_string(tuned_small, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    free = decode(
        model_step(tuned_small, len(tokenizer)),
        tokenizer,
        PROMPTS[:1],
        DecodingConfig(max_new_tokens=24, stop_strings=()),
    )
    stop = free[0][3:6]
    assert stop.strip(), free
    cut = decode(
        model_step(tuned_small, len(tokenizer)),
        tokenizer,
        PROMPTS[:1],
        DecodingConfig(max_new_tokens=24, stop_strings=(stop,)),
    )
    assert cut[0] == free[0][: free[0].index(stop)].strip()


def test_top_p_sampling_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    picks = {int(pick_next(logits, DecodingConfig(temperature=1.0, top_p=0.5), generator)) for _ in range(50)}
    assert picks == {0}
    picks = {int(pick_next(logits, DecodingConfig(temperature=1.0, top_p=0.85), generator)) for _ in range(200)}
    assert picks == {0, 1}
    assert int(pick_next(logits, DecodingConfig(), None)) == 0


def test_generate_command_answers_with_a_saved_adapter(tuned_small, tiny_model_dir, tiny_large_dir, tmp_path):
    import json
    import subprocess
    import sys

    tuned_small.save_pretrained(tmp_path / "adapter")
    command = [
        sys.executable,
        "-m",
        "fedpt_app.tools.cli",
        "generate",
        "--small",
        str(tiny_model_dir),
        "--large",
        str(tiny_large_dir),
        "--adapter",
        str(tmp_path / "adapter"),
        "--max-new-tokens",
        "8",
        "--json",
        "Name a color.",
        "Is 4 even?",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["instruction"] for a in answers] == ["Name a color.", "Is 4 even?"]
    for drafting in (["--draft-tokens", "3"], ["--draft-tokens", "3", "--draft-dtype", "bfloat16"]):
        speculative = subprocess.run(command + drafting, capture_output=True, text=True, timeout=300)
        assert speculative.returncode == 0, speculative.stderr[-2000:]
        assert [json.loads(line) for line in speculative.stdout.splitlines()] == answers  # greedy: the same answers
    missing = subprocess.run(
        command[:9] + [str(tmp_path / "nowhere"), "hello"], capture_output=True, text=True, timeout=300
    )
    assert missing.returncode == 2 and "not a saved peft adapter folder" in missing.stderr


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_large_model_serves_as_logits_provider(
    tuned_small, tiny_model_dir, tiny_tokenizer, tmp_path_factory, quantization
):
    # bitsandbytes' CPU 4-bit kernel needs layer widths divisible by its block size: hidden 64, not 48
    large_dir = save_tiny_llama(
        tmp_path_factory.mktemp(f"proxy-large-{quantization}"), tiny_tokenizer, hidden=64, layers=3, seed=1
    )
    vocab = shared_vocab_size(str(tiny_model_dir), str(large_dir))
    full = LocalLogitsProvider(str(large_dir), vocab)
    quantized = LocalLogitsProvider(str(large_dir), vocab, quantization)
    ids = torch.tensor([[1, 5, 9, 12]])
    mask, positions = torch.ones_like(ids), torch.arange(4)[None]
    error = (quantized.logits(ids, mask, positions)[0] - full.logits(ids, mask, positions)[0]).abs().max().item()
    assert 0 < error < 0.5
    answers = decode(
        proxy_step(quantized, tuned_small, 1.0),
        load_tokenizer(str(tiny_model_dir)),
        PROMPTS[:2],
        DecodingConfig(max_new_tokens=6),
    )
    assert len(answers) == 2


def test_a_runs_proxy_is_served_with_its_proxy_adapter_and_its_small_with_the_final_one(tmp_path):
    """FedPT saves the proxy's adapter (the last aggregate) beside the distilled one: `generate --run` and `serve
    --model proxy` take the first, `serve --model small` the second; runs without one use `adapter/` for both."""
    import argparse
    import json

    from fedpt_app.tools.serving_commands import _generation_models, _serve_models

    for name in ("adapter", "proxy-adapter"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    summary = {
        "small_model": "s",
        "large_model": "l",
        "adapter_base_model": "s",
        "adapter_dir": str(tmp_path / "adapter"),
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary | {"proxy_adapter_dir": str(tmp_path / "proxy-adapter")}))

    def flags(model: str = "proxy") -> argparse.Namespace:
        return argparse.Namespace(run=str(tmp_path), small="", large="", adapter="", model=model)

    assert _generation_models(flags()) == ("s", "l", str(tmp_path / "proxy-adapter"))
    assert _serve_models(flags("proxy"))[2] == str(tmp_path / "proxy-adapter")
    assert _serve_models(flags("small"))[2] == str(tmp_path / "adapter")
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert _generation_models(flags())[2] == str(tmp_path / "adapter")
