"""Speculative proxy decoding: the tuned small model drafts, the proxy-tuned large model verifies.

Plain proxy decoding pays one large forward (and one merged small forward) per token. Here the small model with
its adapter, which the proxy `zL + alpha * (zs_tuned - zs_base)` leans towards, drafts a few tokens cheaply; ONE
large forward and ONE merged tuned/base small forward over those positions then give the proxy's logits at every
one of them, and the drafts the proxy agrees with are kept. Greedy output equals plain proxy decoding token for
token; sampled output keeps the proxy's distribution (speculative sampling, Leviathan et al. 2023, Chen et al. 2023).

Every KV cache holds a prefix of the committed sequence; a forward feeds the committed tokens its cache misses,
and rejected drafts are rolled back with `crop`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel

from fedpt_app.instruct.decoding import (
    DecodingConfig,
    answers,
    causal_lm_logits,
    crop_cache,
    keep_last,
    pick_next,
    positions_of,
    sampling_probs,
    stop_token_ids,
    take_tokens,
)
from fedpt_app.instruct.prompts import build_prompts
from fedpt_app.instruct.proxy import (
    LogitsProvider,
    proxy_logits,
    refuse_embedding_lora,
    requested_logits,
    small_offset,
)


@dataclass
class SpeculativeStats:
    """What the drafts bought: `accepted` counts the drafts kept (in a batch, the fewest any unfinished row
    agreed with), `target_forwards` the large model's forwards (plain proxy decoding: one per token)."""

    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def add(self, other: SpeculativeStats) -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.target_forwards += other.target_forwards


@dataclass
class _Cache:
    """A KV cache and how many positions of the committed sequence it holds."""

    value: Any = None
    length: int = 0

    def keep(self, length: int) -> None:
        if length < self.length:
            crop_cache(self.value, length)
            self.length = length


def _extend(ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ones = torch.ones(mask.shape[0], tokens.shape[1], dtype=mask.dtype)
    return torch.cat([ids, tokens], dim=1), torch.cat([mask, ones], dim=1)


def _draft(
    drafter: torch.nn.Module,
    vocab_size: int,
    cache: _Cache,
    ids: torch.Tensor,
    mask: torch.Tensor,
    count: int,
    config: DecodingConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """`count` tokens of the drafter, one cached forward each, picked as decoding would pick them.

    Returns the ids and mask extended by the drafts and each draft's logits (the draft distribution q).
    """
    draft_logits = []
    for _ in range(count):
        logits, cache.value = causal_lm_logits(
            drafter,
            ids[:, cache.length :],
            mask,
            positions_of(mask)[:, cache.length :],
            cache.value,
            True,
            **keep_last(ids[:, cache.length :], 1),
        )
        cache.length = ids.shape[1]
        draft_logits.append(logits[:, -1, :vocab_size].float())
        ids, mask = _extend(ids, mask, pick_next(draft_logits[-1], config, generator).cpu()[:, None])
    return ids, mask, draft_logits


def _verify(
    large: LogitsProvider,
    small: PeftModel,
    alpha: float,
    caches: tuple[_Cache, _Cache],
    ids: torch.Tensor,
    mask: torch.Tensor,
    count: int,
) -> torch.Tensor:
    """The proxy's logits [B, count, V] at the last `count` positions: one large and one merged small forward."""
    large_cache, small_cache = caches
    start = large_cache.length
    new, positions = ids[:, start:], positions_of(mask)[:, start:]
    large_answer = requested_logits(large, new, mask, positions, large_cache.value, True, last=count)
    offset, small_cache.value = small_offset(
        small, large.vocab_size, new, mask, positions, small_cache.value, True, last=count
    )
    large_logits, large_cache.value = large_answer()
    large_cache.length = small_cache.length = ids.shape[1]
    return proxy_logits(large_logits, offset.to(large_logits.device), 0.0, alpha)


def _accept_greedy(drafts: torch.Tensor, proxy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(drafts each row agrees with, the proxy's tokens): a draft is kept while it is the proxy's argmax, and the
    proxy's argmax after the last kept draft is the correction (or the bonus token)."""
    target = proxy.argmax(-1).cpu()
    agreed = (drafts == target[:, : drafts.shape[1]]).long().cumprod(-1).sum(-1)
    return agreed, target


def _accept_sampled(
    drafts: torch.Tensor,
    draft_logits: list[torch.Tensor],
    proxy: torch.Tensor,
    config: DecodingConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling: draft x, drawn from q, is kept with probability min(1, p(x)/q(x)); the first rejected
    one is replaced by a draw from normalize(max(0, p - q)), and after every draft is kept a bonus token is drawn
    from p. Each kept or drawn token is then distributed as p, the proxy's sampling distribution.
    Returns (drafts each row kept, the row's tokens: kept drafts, then the replacement or bonus token)."""
    target = sampling_probs(proxy, config).cpu()
    draft = [sampling_probs(logits, config).cpu() for logits in draft_logits]
    count = drafts.shape[1]
    tokens = torch.cat([drafts, drafts.new_zeros(drafts.shape[0], 1)], dim=1)
    agreed = torch.zeros(drafts.shape[0], dtype=torch.long)
    for row in range(drafts.shape[0]):
        kept = 0
        while kept < count and _keeps(target[row, kept], draft[kept][row], int(drafts[row, kept]), generator):
            kept += 1
        last = target[row, kept]
        if kept < count:
            residual = (last - draft[kept][row]).clamp(min=0.0)
            last = residual if residual.sum() > 0 else last
        tokens[row, kept] = torch.multinomial(last, 1, generator=generator).item()
        agreed[row] = kept
    return agreed, tokens


def _keeps(target: torch.Tensor, draft: torch.Tensor, token: int, generator: torch.Generator) -> bool:
    return bool(torch.rand((), generator=generator) * draft[token] < target[token])


def speculative_decode(
    large: LogitsProvider,
    small: PeftModel,
    tokenizer,
    prompts: Sequence[str],
    config: DecodingConfig,
    *,
    alpha: float = 1.0,
    draft_tokens: int = 4,
    drafter: torch.nn.Module | None = None,
) -> tuple[list[str], SpeculativeStats]:
    """Continuations of `prompts` by the proxy-tuned large model, as `decode(proxy_step(large, small, alpha), ...)`
    gives them (greedy: the same tokens; sampled: the same distribution), drafted `draft_tokens` at a time by
    `drafter`: `small` with its adapter by default, or any causal LM over the same token ids (`bfloat16_drafter`:
    a cheaper copy of it). The drafter changes only how many drafts are kept, never the output.

    A batch advances by the fewest tokens any unfinished row accepted, so its caches stay rectangular: drafting
    pays off most at batch size 1.
    """
    if draft_tokens < 1:
        raise ValueError("draft_tokens must be at least 1")
    refuse_embedding_lora(small)
    end_ids = stop_token_ids(tokenizer, config.end_token_ids)
    tokenizer.padding_side = "left"
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    generator = torch.Generator().manual_seed(config.seed)
    draft_cache, target_caches = _Cache(), (_Cache(), _Cache())
    generated: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    stats, steps = SpeculativeStats(), 0
    while steps < config.max_new_tokens and not finished.all():
        count = min(draft_tokens, config.max_new_tokens - steps - 1)  # the round adds up to count + 1 tokens
        long_ids, long_mask, draft_logits = _draft(
            small if drafter is None else drafter, large.vocab_size, draft_cache, ids, mask, count, config, generator
        )
        proxy = _verify(large, small, alpha, target_caches, long_ids, long_mask, count + 1)
        drafts = long_ids[:, ids.shape[1] :]
        if config.temperature == 0.0:
            agreed, tokens = _accept_greedy(drafts, proxy)
        else:
            agreed, tokens = _accept_sampled(drafts, draft_logits, proxy, config, generator)
        kept = int(agreed[~finished].min())
        unfinished = int((~finished).sum())
        stats.add(SpeculativeStats(count * unfinished, kept * unfinished, 1))
        for column in tokens[:, : kept + 1].T:
            take_tokens(column, generated, finished, end_ids, config, tokenizer)
        ids, mask = _extend(ids, mask, tokens[:, : kept + 1])
        steps += kept + 1
        for cache in (draft_cache, *target_caches):
            cache.keep(ids.shape[1] - 1)  # the newest token is fed next round
    return answers(tokenizer, generated, config), stats


def bfloat16_drafter(small: PeftModel) -> torch.nn.Module:
    """A bfloat16 copy of `small` with its adapter merged in: on a CPU with bfloat16 matrix units (or a GPU) a
    draft costs a fraction of a float32 one. It only drafts; the proxy that accepts or replaces its tokens is still
    computed by `small` and the large model at their own precision."""
    return copy.deepcopy(small).merge_and_unload().to(torch.bfloat16).eval()


def speculative_generate(
    large: LogitsProvider,
    small: PeftModel,
    tokenizer,
    instructions: Sequence[str],
    *,
    alpha: float = 1.0,
    config: DecodingConfig | None = None,
    draft_tokens: int = 4,
    batch_size: int = 1,
    contexts: Sequence[str] | None = None,
    drafter: torch.nn.Module | None = None,
) -> tuple[list[str], SpeculativeStats]:
    """`proxy_generate` with speculative decoding: answers to instructions in the project's prompt template.

    Batch size 1 by default: a batch only keeps the drafts every row agrees with.
    """
    config = config or DecodingConfig()
    prompts = build_prompts(instructions, contexts)
    small.eval()
    outputs: list[str] = []
    stats = SpeculativeStats()
    for start in range(0, len(prompts), batch_size):
        texts, batch_stats = speculative_decode(
            large,
            small,
            tokenizer,
            prompts[start : start + batch_size],
            config,
            alpha=alpha,
            draft_tokens=draft_tokens,
            drafter=drafter,
        )
        outputs += texts
        stats.add(batch_stats)
    return outputs, stats
