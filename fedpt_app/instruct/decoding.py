"""Batched incremental decoding shared by every model combination (one model, proxy-tuned, large alone).

A *step function* maps the new tokens of a left-padded batch to next-token logits, keeping whatever KV caches
it needs; `decode` owns the loop: token choice (greedy, temperature, top-p), EOS and stop strings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

# Evaluation and `fedpt-app generate` stop here too: models tend to run on into a new prompt section.
DEFAULT_STOP_STRINGS = ("###",)


@dataclass(frozen=True)
class DecodingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = DEFAULT_STOP_STRINGS
    seed: int = 0
    ignore_eos: bool = False  # benchmarks: always produce max_new_tokens
    end_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS: the generation configs' end tokens

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0.0:
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")


# (new input ids [B, t], attention mask of everything so far [B, T], positions of the new ids [B, t]) -> [B, V]
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch (padding gets position 0 and is masked anyway)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def sampling_probs(logits: torch.Tensor, config: DecodingConfig) -> torch.Tensor:
    """The distribution sampling draws from: temperature, then top-p (the smallest set reaching top_p),
    renormalized (speculative sampling's acceptance ratio p(x)/q(x) needs true probabilities)."""
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= config.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def pick_next(logits: torch.Tensor, config: DecodingConfig, generator: torch.Generator | None) -> torch.Tensor:
    if config.temperature == 0.0:
        return logits.argmax(-1)
    return torch.multinomial(sampling_probs(logits, config).cpu(), 1, generator=generator).squeeze(-1)


def decode(
    step: StepFn, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], config: DecodingConfig
) -> list[str]:
    """Continuations of `prompts` (without the prompt), each stopped at EOS or at its first stop string."""
    end_ids = stop_token_ids(tokenizer, config.end_token_ids)
    tokenizer.padding_side = "left"
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
    attention_mask = encoded["attention_mask"]
    step_ids, step_positions = encoded["input_ids"], positions_of(attention_mask)
    generator = torch.Generator().manual_seed(config.seed) if config.temperature > 0 else None
    generated: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(config.max_new_tokens):
        next_ids = pick_next(step(step_ids, attention_mask, step_positions), config, generator).cpu()
        take_tokens(next_ids, generated, finished, end_ids, config, tokenizer)
        if finished.all():
            break
        next_ids = next_ids.masked_fill(finished, tokenizer.pad_token_id)
        attention_mask = torch.cat([attention_mask, torch.ones(len(prompts), 1, dtype=attention_mask.dtype)], dim=1)
        step_ids, step_positions = next_ids[:, None], step_positions[:, -1:] + 1
    return answers(tokenizer, generated, config)


def take_tokens(
    tokens: torch.Tensor,
    generated: list[list[int]],
    finished: torch.Tensor,
    end_ids: set[int],
    config: DecodingConfig,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """One token per unfinished row: an end token finishes its row (unless `ignore_eos`), a stop string finishes
    it after the token that completes it."""
    for row in torch.nonzero(~finished).flatten().tolist():
        token = int(tokens[row])
        if token in end_ids and not config.ignore_eos:
            finished[row] = True
            continue
        generated[row].append(token)
        if config.stop_strings and has_stop(tokenizer.decode(generated[row][-16:]), config.stop_strings):
            finished[row] = True


def answers(tokenizer: PreTrainedTokenizerBase, generated: list[list[int]], config: DecodingConfig) -> list[str]:
    """The rows' texts, each cut at its first stop string."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    return [cut_at_stop(text, config.stop_strings).strip() for text in texts]


def has_stop(text: str, stop_strings: tuple[str, ...]) -> bool:
    return any(stop in text for stop in stop_strings)


def cut_at_stop(text: str, stop_strings: tuple[str, ...]) -> str:
    cuts = [text.index(stop) for stop in stop_strings if stop in text]
    return text[: min(cuts)] if cuts else text


def causal_lm_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Any = None,
    use_cache: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """One forward of a causal LM on its own device: (float32 logits, its KV cache)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        output = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            past_key_values=cache,
            use_cache=use_cache,
            **kwargs,
        )
    return output.logits.float(), output.past_key_values


def keep_last(input_ids: torch.Tensor, last: int) -> dict[str, Any]:
    """The forward argument that runs the LM head on the last `last` positions only ({} for all). The positions go
    as an index tensor, not a count: a count slices the hidden states into a strided view, and for that view
    PyTorch's bfloat16 CPU matmul copies the whole LM head once per sequence (15 GB and 40 s for a batch of 32 on
    Qwen2.5-1.5B); an index tensor gives a contiguous copy."""
    if not last:
        return {}
    length = input_ids.shape[1]
    return {"logits_to_keep": torch.arange(max(0, length - last), length, device=input_ids.device)}


def model_step(model: torch.nn.Module, vocab_size: int) -> StepFn:
    """Plain decoding of one model (with its active adapter, if any), KV-cached, over the tokenizer's `vocab_size`
    tokens (logit rows beyond it are padding, as in Qwen, and are never picked)."""
    state: dict[str, Any] = {"cache": None}

    def step(input_ids, attention_mask, position_ids):
        logits, state["cache"] = causal_lm_logits(model, input_ids, attention_mask, position_ids, state["cache"], True)
        return logits[:, -1, :vocab_size]

    return step


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, end_ids: Iterable[int] = ()) -> set[int]:
    """The ids that end an answer: the tokenizer's EOS, its padding token and `end_ids`. The padding token is never
    part of an answer; Qwen2.5's <|endoftext|> is both its padding token and the end a model writes after a plain
    (non-chat) prompt, which the generation config that the GGUF conversion writes no longer lists."""
    return {tokenizer.eos_token_id, tokenizer.pad_token_id, *end_ids} - {None}


def end_token_ids(*models: object) -> tuple[int, ...]:
    """Every end-of-sequence id the models' generation configs list (Qwen2.5-Instruct: <|im_end|> and
    <|endoftext|>), to stop decoding at any of them."""
    ids: set[int] = set()
    for model in models:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return tuple(sorted(ids))


def crop_cache(cache: Any, length: int) -> None:
    """Drop every cached position from `length` on (speculative decoding's rollback), for any provider's cache.

    transformers' caches take a negative count of positions to remove (the only form every 4.5x-5.x release
    reads the same way); the project's own remote caches take the length to keep.
    """
    if hasattr(cache, "get_seq_length"):
        surplus = cache.get_seq_length() - length
        if surplus > 0:
            cache.crop(-surplus)
    elif cache is not None:
        cache.crop(length)
