"""Shared fixtures: tiny config-built models saved as HF folders, loaded through the project's own loader."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedpt_app.instruct.builtin import builtin_instruction_split
from fedpt_app.instruct.prompts import build_prompt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    rows = builtin_instruction_split("train")[:300]
    texts = [build_prompt(row["instruction"], row["context"]) + row["response"] for row in rows]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_llama(
    folder: Path, tokenizer: PreTrainedTokenizerFast, hidden: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    tiny_llama(tokenizer, hidden, layers, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast, hidden: int = 32, layers: int = 2, seed: int = 0
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_large_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A bigger model with the same tokenizer: a small/large pair for proxy-tuning."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-large"), tiny_tokenizer, hidden=48, layers=3, seed=1)


@pytest.fixture(scope="module")
def tuned_small(tiny_model_dir):
    """The tiny small model with a random (non-zero) adapter, so tuned and base logits differ."""
    from fedpt_app.models.lora import LoraSpec, adapter_state, load_adapter_state, lora_model

    model = lora_model(str(tiny_model_dir), LoraSpec(4, 8.0, target_modules=("q_proj", "v_proj")), seed=0)
    generator = torch.Generator().manual_seed(3)
    load_adapter_state(
        model, {key: torch.randn(value.shape, generator=generator) * 0.5 for key, value in adapter_state(model).items()}
    )
    model.eval()
    return model


@pytest.fixture(scope="module")
def large(tiny_model_dir, tiny_large_dir):
    """The tiny large model as the proxy's logits provider (loaded in this process)."""
    from fedpt_app.instruct.proxy import LocalLogitsProvider, shared_vocab_size

    return LocalLogitsProvider(str(tiny_large_dir), shared_vocab_size(str(tiny_model_dir), str(tiny_large_dir)))


def _foundation_model_dir(folder: Path, build: Callable[[int], torch.nn.Module]) -> Path:
    """`build(vocab_size)`'s model saved in `folder` with the packaged MiniLM tokenizer."""
    from transformers import AutoTokenizer

    from fedpt_app.models.packaged import packaged_folder

    tokenizer = AutoTokenizer.from_pretrained(packaged_folder("all-minilm-l6-v2"))
    torch.manual_seed(0)
    build(tokenizer.vocab_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny BERT encoder (4 layers, hidden 32, FFN 64) with the packaged MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    def build(vocab_size: int) -> torch.nn.Module:
        shape = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
        return BertModel(BertConfig(vocab_size=vocab_size, max_position_embeddings=64, **shape))

    return _foundation_model_dir(tmp_path_factory.mktemp("tiny-bert"), build)


@pytest.fixture(scope="session")
def tiny_llama_fm_dir(tmp_path_factory):
    """A decoder foundation model as a new user would bring one: a 4-layer config-built Llama saved in float16,
    with no padding token in its config, and the packaged MiniLM tokenizer."""

    def build(vocab_size: int) -> torch.nn.Module:
        shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
        config = LlamaConfig(vocab_size=vocab_size, num_key_value_heads=2, max_position_embeddings=64, **shape)
        return LlamaForCausalLM(config).to(torch.float16)

    return _foundation_model_dir(tmp_path_factory.mktemp("tiny-llama-fm"), build)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A vision foundation model: a 4-layer config-built ViT encoder (16×16 images, 4×4 patches: 17 positions with
    the class token) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
    ViTModel(ViTConfig(image_size=16, patch_size=4, **shape), add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder
