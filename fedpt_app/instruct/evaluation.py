"""The instruct family's central evaluation: batched greedy decoding on held-out rows, Rouge-L F1, exact match and
whether the answer contains the reference."""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rouge_score import rouge_scorer
from transformers import PreTrainedTokenizerBase

from fedpt_app.instruct.decoding import DecodingConfig, StepFn, decode


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
    contains: float = 0.0  # percent of normalized predictions holding the normalized reference as whole words


def normalize_answer(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> bool:
    """The same words as the reference, case and punctuation aside."""
    return normalize_answer(prediction) == normalize_answer(reference)


def contains_reference(prediction: str, reference: str) -> bool:
    """The reference's words, in order, somewhere in the answer ("The capital of Gabon is Libreville." holds
    "Libreville"; "Nigeria" does not hold "Niger"): the content of an answer, whatever its form."""
    return f" {normalize_answer(reference)} " in f" {normalize_answer(prediction)} "


def contains_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    hits = [contains_reference(p, r) for p, r in zip(predictions, references, strict=True)]
    return 100.0 * sum(hits) / len(hits)


def score(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """(Rouge-L F1, exact match), both in percent."""
    rouge = [
        _SCORER.score(reference, prediction)["rougeL"].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    ]
    exact = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
    return 100.0 * sum(rouge) / len(rouge), 100.0 * sum(exact) / len(exact)


def exact_match_by_group(
    predictions: Sequence[str], references: Sequence[str], groups: Sequence[str]
) -> dict[str, float]:
    """Exact match (percent) within each group of rows, e.g. the built-in set's knowledge and skill questions."""
    hits: dict[str, list[bool]] = {}
    for prediction, reference, group in zip(predictions, references, groups, strict=True):
        hits.setdefault(group, []).append(exact_match(prediction, reference))
    return {group: 100.0 * sum(values) / len(values) for group, values in hits.items()}


def evaluate_generation(
    new_step: Callable[[], StepFn],
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    decoding: DecodingConfig,
    batch_size: int,
) -> GenerationScores:
    """Answers to `prompts` in batches, each batch decoded with a fresh step function (fresh KV caches)."""
    predictions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        predictions += decode(new_step(), tokenizer, prompts[start : start + batch_size], decoding)
    rouge_l, exact_match = score(predictions, references)
    return GenerationScores(rouge_l, exact_match, predictions, contains_rate(predictions, references))
