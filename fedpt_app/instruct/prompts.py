"""The one prompt template, the rule that cuts long prompts, tokenization with the loss on response tokens only,
and batching."""

from __future__ import annotations

import math
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


def build_prompts(instructions: Sequence[str], contexts: Sequence[str] | None = None) -> list[str]:
    """`build_prompt` of each instruction with its context (none by default)."""
    contexts = contexts or [""] * len(instructions)
    return [build_prompt(instruction, context) for instruction, context in zip(instructions, contexts, strict=True)]


def fit_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, context: str, budget: int) -> tuple[str, bool]:
    """(the prompt within `budget` tokens, whether it was cut). A prompt over budget keeps the longest start of its
    context that fits; if the instruction alone is still too long, the longest start of the instruction. Training,
    distillation and evaluation cut prompts by this one rule."""

    def fits(instruction_text: str, context_text: str) -> bool:
        return len(tokenizer(build_prompt(instruction_text, context_text))["input_ids"]) <= budget

    if fits(instruction, context):
        return build_prompt(instruction, context), False
    context = _longest_start(tokenizer, context, lambda text: fits(instruction, text))
    if not fits(instruction, context):
        instruction = _longest_start(tokenizer, instruction, lambda text: fits(text, ""))
    if not fits(instruction, context):
        raise ValueError(f"The prompt template alone needs more than {budget} tokens: raise max-length")
    return build_prompt(instruction, context), True


def _longest_start(tokenizer: PreTrainedTokenizerBase, text: str, fits) -> str:
    """The longest token prefix of `text` (decoded) for which `fits` holds; "" if none."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    low, high = 0, len(ids)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(tokenizer.decode(ids[:middle])):
            low = middle
        else:
            high = middle - 1
    return tokenizer.decode(ids[:low])


def covering_length(tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]], share: float = 0.95) -> int:
    """The fewest new tokens that hold `share` of the rows' responses in full (their EOS included)."""
    lengths = sorted(len(tokenizer(row["response"].strip(), add_special_tokens=False)["input_ids"]) + 1 for row in rows)
    return lengths[max(0, math.ceil(share * len(lengths)) - 1)]


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class Truncation:
    """How many rows of a split had their prompt or their response cut to fit."""

    rows: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    rows_cut: int = 0  # rows with either cut

    def describe(self, split: str) -> str:
        return (
            f"[fedpt-app] {split}: {self.rows} rows kept, {self.prompts_cut} with the prompt cut to its budget, "
            f"{self.responses_cut} with the response cut at max-length"
        )


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, str], max_length: int, prompt_budget: int
) -> tuple[TokenizedExample, bool, bool]:
    """(prompt + response + EOS with labels on the response only, prompt cut?, response cut?). The prompt is cut to
    `prompt_budget` tokens (fit_prompt), the response to the room left in `max_length`; no row is dropped."""
    prompt, prompt_cut = fit_prompt(tokenizer, row["instruction"], row.get("context", ""), prompt_budget)
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(row["response"].strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    example = TokenizedExample(prompt_ids + response_ids[:room], [IGNORE_INDEX] * len(prompt_ids) + response_ids[:room])
    return example, prompt_cut, len(response_ids) > room


def tokenize_rows(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]], max_length: int, prompt_budget: int
) -> tuple[list[TokenizedExample], Truncation]:
    results = [tokenize_example(tokenizer, row, max_length, prompt_budget) for row in rows]
    truncation = Truncation(
        len(results),
        sum(prompt_cut for _, prompt_cut, _ in results),
        sum(response_cut for _, _, response_cut in results),
        sum(prompt_cut or response_cut for _, prompt_cut, response_cut in results),
    )
    return [example for example, _, _ in results], truncation


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
