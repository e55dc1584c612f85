"""Central evaluation: batched greedy generation on held-out rows, Rouge-L F1 and exact match."""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rouge_score import rouge_scorer
from transformers import PreTrainedTokenizerBase

from fedpt_app.data.prompts import build_prompt



def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    # rouge-score logs through absl, which calls logging.basicConfig() when the root logger has no handler;
    # that would print every Flower log line twice.
    guard = logging.NullHandler()
    logging.getLogger().addHandler(guard)
    try:
        return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    finally:
        logging.getLogger().removeHandler(guard)


_SCORER = _rouge_l_scorer()
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


@dataclass(frozen=True)
class GenerationScores:
    rouge_l: float  # mean Rouge-L F1, in percent
    exact_match: float  # percent of normalized predictions equal to the normalized reference
    predictions: list[str]


def normalize_answer(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def score(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """(Rouge-L F1, exact match), both in percent."""
    rouge = [_SCORER.score(reference, prediction)["rougeL"].fmeasure
             for prediction, reference in zip(predictions, references, strict=True)]
    exact = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)]
    return 100.0 * sum(rouge) / len(rouge), 100.0 * sum(exact) / len(exact)


@torch.no_grad()
def generate_greedy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                    max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations (left-padded batches, KV cache, stop at EOS), without the prompt."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    outputs = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True).to(device)
        generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new_tokens = generated[:, encoded["input_ids"].shape[1]:]
        outputs.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def evaluate_generation(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]], *,
                        max_new_tokens: int, batch_size: int) -> GenerationScores:
    prompts = [build_prompt(row["instruction"], row.get("context", "")) for row in rows]
    predictions = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rouge_l, exact_match = score(predictions, [row["response"] for row in rows])
    return GenerationScores(rouge_l, exact_match, predictions)
