import pytest
import torch
from peft import PeftModel

from fedpt_app.models.loading import ModelLoadError, load_causal_lm, load_tokenizer, resolve_model_ref
from fedpt_app.models.lora import (
    LoraSpec,
    adapter_state,
    from_array_record,
    load_adapter_state,
    lora_model,
    to_array_record,
)


def test_local_folder_loads_through_the_auto_classes(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert model.config.vocab_size == len(tokenizer)
    assert load_causal_lm(str(tiny_model_dir)) is model  # once per process


@pytest.mark.parametrize(
    "ref,match",
    [
        ("/no/such/model", "does not exist"),
        ("./missing-model", "does not exist"),
        ("/no/such/model.gguf", "GGUF model file"),
        ("not a valid id!", "neither"),
    ],
)
def test_bad_references_are_clear_errors(ref, match):
    with pytest.raises(ModelLoadError, match=match):
        resolve_model_ref(ref)


def test_unreachable_hub_id_names_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_tokenizer("no-such-org/no-such-model")


def test_adapter_round_trip_through_an_array_record(tiny_model_dir):
    model = lora_model(str(tiny_model_dir), LoraSpec(r=4, alpha=8.0))
    state = adapter_state(model)
    assert state and all(".lora_A." in key or ".lora_B." in key for key in state)
    changed = {key: torch.randn_like(value) for key, value in state.items()}
    assert all(torch.equal(changed[k], v) for k, v in from_array_record(to_array_record(changed, "float32")).items())
    half = from_array_record(to_array_record(changed, "float16"))
    assert all(torch.allclose(changed[k], v, atol=2e-3, rtol=1e-3) for k, v in half.items())
    load_adapter_state(model, changed)
    assert all(torch.equal(changed[k], v) for k, v in adapter_state(model).items())


def test_adapter_with_wrong_keys_or_shapes_is_rejected(tiny_model_dir):
    model = lora_model(str(tiny_model_dir), LoraSpec(r=4, alpha=8.0))
    state = adapter_state(model)
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(model, {**state, key: torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state(model, {k: v for k, v in state.items() if k != key})


def test_saved_adapter_loads_with_peft(tiny_model_dir, tmp_path):
    model = lora_model(str(tiny_model_dir), LoraSpec(r=4, alpha=8.0))
    model.save_pretrained(tmp_path / "adapter")
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    assert set(adapter_state(reloaded)) == set(adapter_state(model))


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_bitsandbytes_loading_on_cpu(tmp_path_factory, tiny_tokenizer, quantization):
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path_factory.mktemp(f"bnb-{quantization}"), tiny_tokenizer, hidden=64)
    full = load_causal_lm(str(folder))
    quantized = load_causal_lm(str(folder), quantization)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        error = (quantized(ids).logits - full(ids).logits).abs().max().item()
    assert 0 < error < 0.5


def test_bf16_holds_the_weights_in_bfloat16_and_keeps_the_last_positions_logits(tiny_model_dir):
    from fedpt_app.instruct.decoding import causal_lm_logits, keep_last

    full = load_causal_lm(str(tiny_model_dir))
    half = load_causal_lm(str(tiny_model_dir), "bf16")
    assert next(half.parameters()).dtype == torch.bfloat16 and next(full.parameters()).dtype == torch.float32
    ids = torch.tensor([[0, 5, 9, 12], [3, 4, 7, 8]])
    mask, positions = torch.ones_like(ids), torch.arange(4).expand(2, 4)
    assert keep_last(ids, 0) == {} and keep_last(ids, 2)["logits_to_keep"].tolist() == [2, 3]
    every, _ = causal_lm_logits(half, ids, mask, positions)
    last_two, _ = causal_lm_logits(half, ids, mask, positions, **keep_last(ids, 2))
    assert last_two.dtype == torch.float32 and torch.equal(last_two, every[:, -2:])
    reference, _ = causal_lm_logits(full, ids, mask, positions)
    assert (every - reference).abs().max().item() < 0.1  # bfloat16 rounding, not another model
