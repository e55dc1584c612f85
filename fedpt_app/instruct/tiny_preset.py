"""Builds the embedded offline "tiny" preset: a small and a large Llama causal LM sharing one tokenizer.

Everything is made from scratch on the built-in corpus (`fedpt_app.instruct.builtin`), so the preset needs no
network: a byte-level BPE tokenizer, then two `LlamaForCausalLM`s pre-trained on packed fact documents. The
large model learns the world's facts clearly better than the small one, which is what the federated
small-to-large transfer experiments need. The result is a pair of ordinary Hugging Face folders.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedpt_app.instruct.builtin import builtin_instruction_split, pretraining_corpus

PROMPT_TEMPLATE_MARKERS = ("### Instruction:\n", "\n\n### Input:\n", "\n\n### Response:\n")  # tokenizer only

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
VOCAB_SIZE = 1536
MAX_LENGTH = 256
BLOCK_SIZE = 128
CORPUS_DOCUMENTS = 24000  # ~1.07M tokens: the large model sees each training block about once
HELDOUT_DOCUMENTS = 300
MODEL_NAMES = ("small", "large")


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    warmup: int


# The whole build takes ~2 minutes on 2 CPU cores. The world is so small that a 0.2M-parameter model trained as
# long as the large one memorizes nearly all of it (held-out loss within ~0.1 nats of the large), so the small
# model gets a shorter budget: it stops knowing only part of the facts, a clearly weaker base model.
TRAIN_SETTINGS = {
    "small": TrainSettings(steps=400, batch_size=8, lr=3e-3, warmup=30),
    "large": TrainSettings(steps=900, batch_size=8, lr=3e-3, warmup=40),
}


def _render_instruction(row: dict[str, str]) -> str:
    instruction, context, response = PROMPT_TEMPLATE_MARKERS
    text = instruction + row["instruction"]
    if row["context"]:
        text += context + row["context"]
    return text + response + row["response"]


def train_tokenizer(corpus: list[str], instruction_rows: list[dict[str, str]]) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text encodes losslessly; template markers are seen often enough to be cheap."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus + [_render_instruction(row) for row in instruction_rows], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_LENGTH,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
    )


def build_configs(tokenizer: PreTrainedTokenizerFast) -> dict[str, LlamaConfig]:
    shared = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": MAX_LENGTH,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "rms_norm_eps": 1e-5,
    }
    return {
        "small": LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=192,
            **shared,
        ),
        "large": LlamaConfig(
            hidden_size=192,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=512,
            **shared,
        ),
    }


def pack_blocks(tokenizer: PreTrainedTokenizerFast, documents: list[str], block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Documents joined with eos into one stream, cut into full blocks (the ragged tail is dropped)."""
    stream: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    num_blocks = len(stream) // block_size
    return torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


def pretrain(
    model: LlamaForCausalLM,
    blocks: torch.Tensor,
    settings: TrainSettings,
    seed: int,
    log: Callable[[str], None],
    name: str,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_factor(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order = torch.randperm(len(blocks), generator=generator)
    cursor, start = 0, time.perf_counter()
    model.train()
    for step in range(settings.steps):
        if cursor + settings.batch_size > len(order):
            order, cursor = torch.randperm(len(blocks), generator=generator), 0
        batch = blocks[order[cursor : cursor + settings.batch_size]]
        cursor += settings.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == settings.steps - 1:
            log(
                f"[tiny-preset] {name} step {step + 1}/{settings.steps} loss {loss.item():.3f} "
                f"elapsed {time.perf_counter() - start:.1f}s"
            )
    model.eval()


@torch.no_grad()
def heldout_loss(model: LlamaForCausalLM, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss over held-out blocks (every block has the same number of predicted tokens)."""
    model.eval()
    losses = [model(input_ids=batch, labels=batch).loss.item() * len(batch) for batch in blocks.split(batch_size)]
    return sum(losses) / len(blocks)


def _is_complete(folder: Path) -> bool:
    return (folder / "report.json").is_file() and all(
        (folder / name / file).is_file()
        for name in MODEL_NAMES
        for file in ("config.json", "model.safetensors", "tokenizer.json")
    )


def build_tiny_preset(destination: Path, *, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Build the preset into `destination` (atomically) and return its report; reuse a complete one."""
    destination = Path(destination)
    if _is_complete(destination):
        return json.loads((destination / "report.json").read_text())
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the preset is an ordinary, shareable model folder
    try:
        started = time.perf_counter()
        corpus = pretraining_corpus(CORPUS_DOCUMENTS, seed=seed)
        tokenizer = train_tokenizer(corpus, builtin_instruction_split("train", seed=seed))
        train_blocks = pack_blocks(tokenizer, corpus)
        heldout_blocks = pack_blocks(tokenizer, pretraining_corpus(HELDOUT_DOCUMENTS, seed=seed + 1000))
        log(
            f"[tiny-preset] tokenizer vocab {len(tokenizer)}, {len(train_blocks)} training blocks of "
            f"{BLOCK_SIZE} tokens, {len(heldout_blocks)} held-out blocks"
        )
        report: dict = {}
        for index, (name, config) in enumerate(build_configs(tokenizer).items()):
            torch.manual_seed(seed + index)
            model = LlamaForCausalLM(config)
            pretrain(model, train_blocks, TRAIN_SETTINGS[name], seed + index, log, name)
            loss = heldout_loss(model, heldout_blocks)
            report[name] = {"parameters": sum(p.numel() for p in model.parameters()), "heldout_loss": loss}
            log(f"[tiny-preset] {name}: {report[name]['parameters']:,} parameters, held-out loss {loss:.3f}")
            model.save_pretrained(staging / name, safe_serialization=True)
            tokenizer.save_pretrained(staging / name)
        report.update(
            tokenizer_vocab_size=len(tokenizer),
            pretrain_seconds=time.perf_counter() - started,
            seed=seed,
            corpus_documents=CORPUS_DOCUMENTS,
        )
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        if destination.exists() and not _is_complete(destination):
            shutil.rmtree(destination)  # a leftover from an interrupted, non-atomic copy
        try:
            os.replace(staging, destination)
        except OSError:  # another builder finished first: keep theirs
            if not _is_complete(destination):
                raise
            return json.loads((destination / "report.json").read_text())
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Pre-train the embedded offline tiny preset.")
    parser.add_argument("--destination", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build_tiny_preset(args.destination, seed=args.seed), indent=2))


if __name__ == "__main__":
    main()
