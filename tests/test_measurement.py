"""Properties a comparison relies on, each checked where it can break: the client schedule, the stop tokens, the
vocabulary of plain decoding, alpha 0, LoRA on embeddings, the evaluation sets, FedOT's parameter budget and
distillation that does not drift."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from fedpt_app.federation.schedule import round_sample
from fedpt_app.instruct.decoding import DecodingConfig, decode, end_token_ids, model_step
from fedpt_app.instruct.proxy import (
    LocalLogitsProvider,
    large_only_step,
    proxy_step,
    refuse_embedding_lora,
    shared_vocab_size,
)
from fedpt_app.models.loading import load_tokenizer
from fedpt_app.models.lora import LoraSpec, adapter_state, load_adapter_state, lora_model
from tests.conftest import save_tiny_llama
from tests.test_proxy import PROMPTS


def _random_adapter(model, seed: int, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(value.shape, generator=generator) * scale for key, value in adapter_state(model).items()}
    load_adapter_state(model, state)


# ---- the client schedule -----------------------------------------------------------------------------------
def test_the_round_sample_depends_on_seed_round_and_identities_only():
    identities = [f"partition-{k}" for k in range(10)]
    first = round_sample(identities, 3, seed=0, server_round=1)
    assert first == round_sample(list(reversed(identities)), 3, seed=0, server_round=1)  # not on arrival order
    assert len(first) == 3 and first == sorted(first) and set(first) <= set(identities)
    schedule = [round_sample(identities, 3, seed=0, server_round=r) for r in range(1, 11)]
    assert len({tuple(s) for s in schedule}) > 1  # rounds differ
    assert schedule != [round_sample(identities, 3, seed=1, server_round=r) for r in range(1, 11)]
    assert round_sample(identities[:2], 3, seed=0, server_round=1) == identities[:2]  # fewer than asked: all


# ---- decoding ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def padded_small(tmp_path_factory, tiny_tokenizer):
    """A small model with 16 padding logit rows that win the argmax after the first prompt, and a generation config
    that lists a second end-of-sequence token (an ordinary token, as Qwen's <|im_end|> is to its tokenizer's EOS)."""
    folder = save_tiny_llama(tmp_path_factory.mktemp("padded-small"), tiny_tokenizer)
    config = AutoConfig.from_pretrained(folder)
    config.vocab_size, config.tie_word_embeddings = len(tiny_tokenizer) + 16, False
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # padding rows aligned with the prompt's last hidden state: logit 100 there
        hidden = model(**tiny_tokenizer(PROMPTS[:1], return_tensors="pt"), output_hidden_states=True).hidden_states
        last = hidden[-1][0, -1]
        model.lm_head.weight[len(tiny_tokenizer) :] = 100.0 * last / last.pow(2).sum()
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, _word_id(tiny_tokenizer)]
    model.save_pretrained(folder)
    return folder


def _word_id(tokenizer) -> int:
    return tokenizer("cold", add_special_tokens=False)["input_ids"][0]


def test_plain_decoding_never_picks_a_padding_row(padded_small, tiny_tokenizer):
    model = lora_model(str(padded_small), LoraSpec(4, 8.0, target_modules=("q_proj",)), seed=0)
    encoded = tiny_tokenizer(PROMPTS[:1], return_tensors="pt")
    positions = torch.arange(encoded["input_ids"].shape[1])[None]
    logits = model_step(model, len(tiny_tokenizer))(encoded["input_ids"], encoded["attention_mask"], positions)
    assert logits.shape[-1] == len(tiny_tokenizer)
    with torch.no_grad():
        uncut = model(**encoded).logits[:, -1]
    assert int(uncut.argmax(-1)) >= len(tiny_tokenizer)  # without the cut a padding row would be chosen


def test_decoding_stops_at_every_end_token_of_the_generation_config(padded_small, tiny_tokenizer):
    model = lora_model(str(padded_small), LoraSpec(4, 8.0, target_modules=("q_proj",)), seed=0)
    word = _word_id(tiny_tokenizer)
    assert end_token_ids(model) == tuple(sorted({tiny_tokenizer.eos_token_id, word}))

    def always_the_word(input_ids, attention_mask, position_ids):
        logits = torch.zeros(input_ids.shape[0], len(tiny_tokenizer))
        logits[:, word] = 1.0
        return logits

    ends = DecodingConfig(max_new_tokens=5, stop_strings=(), end_token_ids=end_token_ids(model))
    assert decode(always_the_word, tiny_tokenizer, PROMPTS[:1], ends) == [""]
    run_on = decode(always_the_word, tiny_tokenizer, PROMPTS[:1], DecodingConfig(max_new_tokens=5, stop_strings=()))
    assert run_on == [tiny_tokenizer.decode([word] * 5).strip()] and run_on[0]  # the tokenizer's EOS alone: no stop


def test_decoding_stops_at_the_padding_token(tiny_tokenizer):
    word, pad = _word_id(tiny_tokenizer), tiny_tokenizer.pad_token_id
    assert pad != tiny_tokenizer.eos_token_id

    def word_pad_word(input_ids, attention_mask, position_ids):
        generated = attention_mask.shape[1] - tiny_tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"].shape[1]
        logits = torch.zeros(input_ids.shape[0], len(tiny_tokenizer))
        logits[:, pad if generated == 1 else word] = 1.0
        return logits

    answer = decode(word_pad_word, tiny_tokenizer, PROMPTS[:1], DecodingConfig(max_new_tokens=5, stop_strings=()))
    assert answer == [tiny_tokenizer.decode([word]).strip()]


def test_alpha_zero_decodes_exactly_as_the_large_model_alone(tiny_model_dir, tiny_large_dir):
    small = lora_model(str(tiny_model_dir), LoraSpec(4, 8.0, target_modules=("q_proj", "v_proj")), seed=0)
    _random_adapter(small, seed=3)
    large = LocalLogitsProvider(str(tiny_large_dir), shared_vocab_size(str(tiny_model_dir), str(tiny_large_dir)))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    config = DecodingConfig(max_new_tokens=16, stop_strings=())
    alone = decode(large_only_step(large), tokenizer, PROMPTS, config)
    assert decode(proxy_step(large, small, 0.0), tokenizer, PROMPTS, config) == alone
    assert decode(proxy_step(large, small, 1.0), tokenizer, PROMPTS, config) != alone  # alpha reaches decoding


def test_lora_on_an_embedding_is_refused_for_proxy_tuning(tiny_model_dir, tiny_large_dir):
    from peft import get_peft_model

    from fedpt_app.instruct.distill import DistillConfig, ProxyDistiller
    from fedpt_app.models.loading import load_causal_lm

    base = load_causal_lm.__wrapped__(str(tiny_model_dir))
    small = get_peft_model(base, LoraSpec(4, 8.0, target_modules=("embed_tokens", "q_proj")).peft_config())
    with pytest.raises(ValueError, match="LoRA on embedding layers .*embed_tokens"):
        refuse_embedding_lora(small)
    large = LocalLogitsProvider(str(tiny_large_dir), shared_vocab_size(str(tiny_model_dir), str(tiny_large_dir)))
    with pytest.raises(ValueError, match="cannot be proxy-tuned"):
        proxy_step(large, small, 1.0)
    with pytest.raises(ValueError, match="cannot be proxy-tuned"):
        ProxyDistiller(small, large, [object()], DistillConfig(1.0, 1.0, 1, 1e-3, 1, 0), 0, "off", 0.0, None)


# ---- evaluation sets -------------------------------------------------------------------------------------------
def test_the_paper_evaluation_sets_load_whole_from_their_configs(tmp_path, monkeypatch):
    """A local folder in the layout of the Self-Instruct release stands in for the hub (no network here)."""
    from fedpt_app.instruct import data

    (tmp_path / "human_eval").mkdir()
    (tmp_path / "superni").mkdir()
    human = [
        {
            "id": f"user_oriented_task_{k}",
            "motivation_app": "Grammarly",
            "instruction": f"Fix sentence {k}.",
            "instances": {"input": [f"sentance {k}"], "output": [f"sentence {k}"]},
        }
        for k in range(5)
    ]
    superni = [{"prompt": f"Definition: add one.\n\nInput: {k}", "completion": str(k + 1)} for k in range(7)]
    (tmp_path / "human_eval" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in human))
    (tmp_path / "superni" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in superni))
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: human_eval\n  data_files:\n  - split: train\n    path: human_eval/train.jsonl\n"
        "- config_name: super_natural_instructions\n  data_files:\n  - split: test\n    path: superni/test.jsonl\n---\n"
    )
    monkeypatch.setitem(data.EVALUATION_SETS, "self-instruct", data.HubSplit(str(tmp_path), "human_eval", "train"))
    monkeypatch.setitem(
        data.EVALUATION_SETS, "super-ni", data.HubSplit(str(tmp_path), "super_natural_instructions", "test")
    )
    data._evaluation_set.cache_clear()
    rows = data.load_test_rows("builtin", "self-instruct", 0.1, seed=0)
    assert len(rows) == 5 and rows[2] == {
        "instruction": "Fix sentence 2.",
        "context": "sentance 2",
        "response": "sentence 2",
        "category": "Grammarly",
    }
    assert len(data.load_test_rows("builtin", "super-ni", 0.1, seed=0)) == 7  # used whole
    whole = data.load_test_rows("builtin", "super-ni", 0.1, seed=0)
    sample = data.load_test_rows("builtin", "super-ni", 0.1, seed=0, samples=3)
    assert len(sample) == 3 and [whole.index(row) for row in sample] == sorted(whole.index(row) for row in sample)
    assert sample == data.load_test_rows("builtin", "super-ni", 0.1, seed=0, samples=3)  # seeded
    data._evaluation_set.cache_clear()


# ---- FedOT's parameter budget and alignment without dropout ------------------------------------------------------
def test_fedot_trains_about_as_many_parameters_as_fedpft(tiny_bert_dir, tmp_path, monkeypatch):
    from fedpt_app.classify.strategies.fedot import FedOT
    from fedpt_app.classify.strategies.fedpft import FedPFT
    from fedpt_app.config import RunConfig

    monkeypatch.setenv("FEDPT_CACHE", str(tmp_path / "cache"))
    common = {
        "foundation-model": str(tiny_bert_dir),
        "align-steps": 1,
        "public-samples": 16,
        "max-length": 16,
        "eval-samples": 8,
    }

    def trainable(algorithm: str, strategy_class) -> int:
        config = RunConfig.from_mapping({**common, "algorithm": algorithm, "output-dir": str(tmp_path / algorithm)})
        return sum(
            parameter.numel() for parameter in strategy_class(config).model.parameters() if parameter.requires_grad
        )

    fedpft, fedot = trainable("fedpft", FedPFT), trainable("fedot", FedOT)
    assert abs(fedot - fedpft) / fedpft < 0.05, (fedot, fedpft)


def test_alignment_runs_the_student_without_dropout():
    """Two alignments from the same start give the same weights whatever the global RNG holds: no dropout noise."""
    from transformers import BertConfig, BertModel

    from fedpt_app.classify.compression.alignment import distill, ffn_parameters, only_trainable
    from fedpt_app.classify.compression.ffn import find_ffns

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.5,
        attention_probs_dropout_prob=0.5,
    )
    teacher = BertModel(config)
    batch = {"input_ids": torch.randint(0, 50, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    results = []
    for rng_seed in (1, 2):
        student = BertModel(config)
        student.load_state_dict(teacher.state_dict())
        with torch.no_grad():
            find_ffns(student)[1].up.weight.mul_(0.5)
        parameters = ffn_parameters(find_ffns(student)[1], with_norms=False)
        torch.manual_seed(rng_seed)
        with only_trainable(student, parameters):
            distill(teacher, student, parameters, [batch] * 3, pairs=[(2, 2)], steps=3, lr=1e-2)
        results.append(find_ffns(student)[1].up.weight.detach().clone())
    assert torch.equal(results[0], results[1])
