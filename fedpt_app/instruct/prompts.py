"""The one prompt template, tokenization with the loss on response tokens only, and batching."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss there


def build_prompt(instruction: str, context: str = "") -> str:
    """Alpaca/Dolly-style prompt; the response follows it directly."""
    prompt = f"### Instruction:\n{instruction.strip()}"
    if context.strip():
        prompt += f"\n\n### Input:\n{context.strip()}"
    return prompt + "\n\n### Response:\n"


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, str], max_length: int
) -> TokenizedExample | None:
    """Prompt + response + EOS, labels masked on the prompt; None when no response token fits in max_length."""
    prompt_ids = tokenizer(build_prompt(row["instruction"], row.get("context", "")))["input_ids"]
    response_ids = tokenizer(row["response"].strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return TokenizedExample(input_ids, labels)


def tokenize_rows(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]], max_length: int
) -> list[TokenizedExample]:
    examples = [tokenize_example(tokenizer, row, max_length) for row in rows]
    return [example for example in examples if example is not None]


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for teacher-forced training."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def batches(
    examples: Sequence[TokenizedExample], batch_size: int, pad_token_id: int, generator: torch.Generator | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled (when a generator is given) mini-batches of one pass over the examples."""
    order = torch.randperm(len(examples), generator=generator).tolist() if generator else range(len(examples))
    order = list(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)
