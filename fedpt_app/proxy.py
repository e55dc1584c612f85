"""Proxy-tuning: the large model is used only through its next-token logits, shifted by the small model's
tuned-minus-untuned offset, `z = zL + alpha * (zs_tuned - zs_base)`, and decoded with a KV cache per model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedpt_app.models.loading import load_causal_lm, load_tokenizer

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


class VocabularyMismatchError(ValueError):
    """Small and large models that do not share a tokenizer: proxy-tuning cannot combine their logits."""


class LogitsProvider(Protocol):
    """Next-token logits of a causal LM over the shared vocabulary: all the proxy needs of the large model.

    `cache` is the provider's own incremental-decoding state (None to start, or for teacher forcing).
    """

    vocab_size: int

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               cache: Any = None, use_cache: bool = False) -> tuple[torch.Tensor, Any]: ...


class LocalLogitsProvider:
    """A causal LM loaded through the project's loader (optionally 8-bit/4-bit), queried for logits only."""

    def __init__(self, model_ref: str, vocab_size: int, quantization: str = "none") -> None:
        self.model = load_causal_lm(model_ref, quantization)
        self.vocab_size = vocab_size
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, input_ids, attention_mask, position_ids, cache=None, use_cache=False):
        output = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                            position_ids=position_ids.to(self.device), past_key_values=cache, use_cache=use_cache)
        return output.logits[..., :self.vocab_size].float(), output.past_key_values


def shared_vocab_size(small_ref: str, large_ref: str) -> int:
    """Width of the shared vocabulary; logit rows beyond it (padding, as in Qwen) are dropped.

    Same tokenizer vocabulary: fine. Otherwise a clear error naming both models, before any training.
    """
    small, large = load_tokenizer(small_ref), load_tokenizer(large_ref)
    if small.get_vocab() != large.get_vocab():
        only_small = len(set(small.get_vocab()) - set(large.get_vocab()))
        only_large = len(set(large.get_vocab()) - set(small.get_vocab()))
        raise VocabularyMismatchError(
            f"Models {small_ref!r} ({len(small)} tokens) and {large_ref!r} ({len(large)} tokens) do not share a "
            f"tokenizer ({only_small} tokens only in the small, {only_large} only in the large): proxy-tuning needs "
            "a same-family pair")
    vocab_size = len(small)
    for ref in (small_ref, large_ref):
        width = load_causal_lm(ref).get_output_embeddings().weight.shape[0]
        if width < vocab_size:
            raise VocabularyMismatchError(f"Model {ref!r} has {width} logit rows for a {vocab_size}-token vocabulary")
    return vocab_size


def proxy_logits(large: torch.Tensor, small_tuned: torch.Tensor, small_base: torch.Tensor, alpha: float) -> torch.Tensor:
    return large + alpha * (small_tuned - small_base)


@torch.no_grad()
def small_offset(small: PeftModel, vocab_size: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache: Any = None, use_cache: bool = False) -> tuple[torch.Tensor, Any]:
    """`zs_tuned - zs_base` from ONE batched forward: the batch twice, the second half with the adapter off."""
    batch = input_ids.shape[0]
    device = next(small.parameters()).device
    output = small(input_ids=torch.cat([input_ids, input_ids]).to(device),
                   attention_mask=torch.cat([attention_mask, attention_mask]).to(device),
                   position_ids=torch.cat([position_ids, position_ids]).to(device), past_key_values=cache,
                   use_cache=use_cache, adapter_names=[small.active_adapter] * batch + [BASE_ADAPTER] * batch)
    logits = output.logits[..., :vocab_size].float()
    return logits[:batch] - logits[batch:], output.past_key_values


# ---- decoding ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int = 0


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch (padding gets position 0 and is masked anyway)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def pick_next(logits: torch.Tensor, config: DecodingConfig, generator: torch.Generator | None) -> torch.Tensor:
    if config.temperature <= 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > config.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


# A decoding step: (new input ids, full attention mask, their positions) -> next-token logits [batch, vocab].
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decode(step: StepFn, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], config: DecodingConfig) -> list[str]:
    """Batched decoding loop shared by every model combination; stops at EOS or a stop string per row."""
    tokenizer.padding_side = "left"
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
    attention_mask = encoded["attention_mask"]
    step_ids, step_positions = encoded["input_ids"], positions_of(attention_mask)
    generator = torch.Generator().manual_seed(config.seed) if config.temperature > 0 else None
    generated = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(config.max_new_tokens):
        next_ids = pick_next(step(step_ids, attention_mask, step_positions), config, generator).cpu()
        for row in torch.nonzero(~finished).flatten().tolist():
            token = int(next_ids[row])
            if token == tokenizer.eos_token_id:
                finished[row] = True
                continue
            generated[row].append(token)
            if config.stop_strings and any(s in tokenizer.decode(generated[row]) for s in config.stop_strings):
                finished[row] = True
        if finished.all():
            break
        next_ids = next_ids.masked_fill(finished, tokenizer.pad_token_id)
        attention_mask = torch.cat([attention_mask, torch.ones(len(prompts), 1, dtype=attention_mask.dtype)], dim=1)
        step_ids, step_positions = next_ids[:, None], step_positions[:, -1:] + 1
    return [_cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), config.stop_strings).strip()
            for ids in generated]


def _cut_at_stop(text: str, stop_strings: tuple[str, ...]) -> str:
    cuts = [text.index(s) for s in stop_strings if s in text]
    return text[:min(cuts)] if cuts else text


def proxy_step(large: LogitsProvider, small: PeftModel, alpha: float) -> StepFn:
    """Proxy-tuned next-token logits with a KV cache for the large model and for the merged small forward."""
    caches: dict[str, Any] = {"large": None, "small": None}

    def step(input_ids, attention_mask, position_ids):
        large_logits, caches["large"] = large.logits(input_ids, attention_mask, position_ids, caches["large"], True)
        offset, caches["small"] = small_offset(small, large.vocab_size, input_ids, attention_mask, position_ids,
                                               caches["small"], True)
        return proxy_logits(large_logits[:, -1].cpu(), offset[:, -1].cpu(), 0.0, alpha)

    return step


def large_only_step(large: LogitsProvider) -> StepFn:
    cache: dict[str, Any] = {"large": None}

    def step(input_ids, attention_mask, position_ids):
        logits, cache["large"] = large.logits(input_ids, attention_mask, position_ids, cache["large"], True)
        return logits[:, -1].cpu()

    return step


def naive_proxy_step(large: LogitsProvider, small: PeftModel, alpha: float) -> StepFn:
    """Reference: three separate full forwards per token, no KV cache (what the fast path must equal)."""
    history: dict[str, torch.Tensor] = {}

    def step(input_ids, attention_mask, position_ids):
        history["ids"] = input_ids if "ids" not in history else torch.cat([history["ids"], input_ids], dim=1)
        ids, positions = history["ids"], positions_of(attention_mask)
        device = next(small.parameters()).device
        large_logits, _ = large.logits(ids, attention_mask, positions)
        with torch.no_grad():
            tuned = small(input_ids=ids.to(device), attention_mask=attention_mask.to(device),
                          position_ids=positions.to(device)).logits
            with small.disable_adapter():
                base = small(input_ids=ids.to(device), attention_mask=attention_mask.to(device),
                             position_ids=positions.to(device)).logits
        vocab = large.vocab_size
        return proxy_logits(large_logits[:, -1].cpu(), tuned[:, -1, :vocab].float().cpu(),
                            base[:, -1, :vocab].float().cpu(), alpha)

    return step
