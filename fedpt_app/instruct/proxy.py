"""Proxy-tuning: the large model is used only through its next-token logits, shifted by the small model's
tuned-minus-untuned offset, `z = zL + alpha * (zs_tuned - zs_base)` over the shared vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from peft import PeftModel
from transformers import AutoConfig

from fedpt_app.instruct.decoding import (
    DecodingConfig,
    StepFn,
    causal_lm_logits,
    decode,
    end_token_ids,
    keep_last,
    positions_of,
)
from fedpt_app.instruct.prompts import build_prompts
from fedpt_app.models.loading import load_causal_lm, load_tokenizer, resolve_model_ref


class VocabularyMismatchError(ValueError):
    """Small and large models that do not share a tokenizer: proxy-tuning cannot combine their logits."""


class LogitsProvider(Protocol):
    """Next-token logits of a causal LM over the shared vocabulary: all the proxy needs of the large model.

    `cache` is the provider's own incremental-decoding state (None to start, or for teacher forcing);
    `decoding.crop_cache(cache, length)` drops every position from `length` on (speculative decoding's rollback).
    `last` asks for the logits of the last `last` new positions only (0: every new position), which is what
    decoding needs and what a remote provider sends over the wire. `logits_at` is teacher forcing: the rows of
    the positions `mask` [B, T] selects, in row-major order (`top_k`: the caller keeps only each row's k largest,
    so a remote provider sends only those). Logits may come shifted by a constant per position (log-probabilities,
    as a remote service sends them): the proxy's softmax, argmax and KD targets ignore it.
    A provider that computes elsewhere may also offer `submit(...)`, `logits` returning a future, so the caller
    runs the small model meanwhile (`requested_logits`).
    `LocalLogitsProvider` loads the weights; `fedpt_app.serving.remote` queries a service; `fedpt_app.serving.
    providers.load_logits_provider` picks one from a `large-model` reference.
    """

    vocab_size: int
    end_token_ids: tuple[int, ...]  # the model's end-of-sequence ids (its generation config's)

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any = None,
        use_cache: bool = False,
        last: int = 0,
    ) -> tuple[torch.Tensor, Any]: ...

    def logits_at(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        top_k: int = 0,
    ) -> torch.Tensor: ...


class LocalLogitsProvider:
    """A causal LM loaded through the project's loader (optionally 8-bit/4-bit), queried for logits only: its
    log-probabilities over the shared vocabulary, exactly what `fedpt-app serve-logits` sends for the same model."""

    def __init__(self, model_ref: str, vocab_size: int, quantization: str = "none", spread: bool = False) -> None:
        self.model = load_causal_lm(model_ref, quantization, spread)
        self.vocab_size = vocab_size
        self.end_token_ids = end_token_ids(self.model)

    def logits(self, input_ids, attention_mask, position_ids, cache=None, use_cache=False, last=0):
        keep = keep_last(input_ids, last)  # skips the LM head on the positions nobody reads
        logits, cache = causal_lm_logits(self.model, input_ids, attention_mask, position_ids, cache, use_cache, **keep)
        return torch.log_softmax(logits[:, -last:, : self.vocab_size], dim=-1), cache

    def logits_at(self, input_ids, attention_mask, position_ids, mask, top_k=0):
        """The selected rows, normalised after selection (`top_k` only saves traffic for a remote provider; the
        caller keeps the top-k it needs)."""
        logits, _ = causal_lm_logits(self.model, input_ids, attention_mask, position_ids)
        return torch.log_softmax(logits[mask.to(logits.device)][:, : self.vocab_size], dim=-1)


def check_logit_widths(vocab_size: int, widths: dict[str, int]) -> int:
    """The shared width to combine logits over: the tokenizer's vocabulary, when every model has at least that
    many logit rows (extra rows are padding, as in Qwen, and are dropped)."""
    for ref, width in widths.items():
        if width < vocab_size:
            raise VocabularyMismatchError(
                f"Model {ref!r} has {width} logit rows for a {vocab_size}-token "
                "vocabulary: it does not match its tokenizer"
            )
    return vocab_size


def shared_vocab_size(small_ref: str, large_ref: str) -> int:
    """Width of the vocabulary both models share, checked before any training.

    Same tokenizer vocabulary: fine; logit widths beyond it (padding rows) are truncated; otherwise a clear
    error naming both models.
    """
    small, large = load_tokenizer(small_ref), load_tokenizer(large_ref)
    small_vocab, large_vocab = small.get_vocab(), large.get_vocab()
    if small_vocab != large_vocab:
        only_small = len(small_vocab.keys() - large_vocab.keys())
        only_large = len(large_vocab.keys() - small_vocab.keys())
        raise VocabularyMismatchError(
            f"Models {small_ref!r} ({len(small_vocab)} tokens) and {large_ref!r} ({len(large_vocab)} tokens) do "
            f"not share a tokenizer ({only_small} tokens only in the small, {only_large} only in the large, the "
            "rest may map to different ids): proxy-tuning needs a same-family pair"
        )
    widths = {
        ref: AutoConfig.from_pretrained(resolve_model_ref(ref)).get_text_config().vocab_size
        for ref in (small_ref, large_ref)
    }  # from the configs: no weights loaded for the check
    return check_logit_widths(len(small_vocab), widths)


def proxy_logits(
    large: torch.Tensor, small_tuned: torch.Tensor, small_base: torch.Tensor | float, alpha: float
) -> torch.Tensor:
    return large + alpha * (small_tuned - small_base)


def small_offset(
    small: PeftModel,
    vocab_size: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Any = None,
    use_cache: bool = False,
    last: int = 0,
) -> tuple[torch.Tensor, Any]:
    """`zs_tuned - zs_base` from ONE batched forward (`tuned_and_base`)."""
    (tuned, base), cache = tuned_and_base(
        small, vocab_size, input_ids, attention_mask, position_ids, cache, use_cache, last
    )
    return tuned - base, cache


def tuned_and_base(
    small: PeftModel,
    vocab_size: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Any = None,
    use_cache: bool = False,
    last: int = 0,
) -> tuple[tuple[torch.Tensor, torch.Tensor], Any]:
    """(`zs_tuned`, `zs_base`) from ONE batched forward: the batch twice, the adapter applied to the first half
    only; for the last `last` positions only (0: all; the LM head skipped elsewhere, which matters on a long
    prompt)."""
    batch = input_ids.shape[0]
    keep = keep_last(input_ids, last)
    with adapter_on_first_rows(small, batch, 2 * batch):
        logits, cache = causal_lm_logits(
            small,
            torch.cat([input_ids, input_ids]),
            torch.cat([attention_mask, attention_mask]),
            torch.cat([position_ids, position_ids]),
            cache,
            use_cache,
            **keep,
        )
    logits = logits[..., :vocab_size]
    return (logits[:batch], logits[batch:]), cache


def refuse_embedding_lora(model: PeftModel) -> None:
    """The merged forward masks LoRA's output through its `lora_B` modules; LoRA on an embedding has none (peft keeps
    its matrices as parameters), so the adapter would stay on in the "untuned" half: refuse it up front."""
    embeddings = sorted(
        {name.split(".lora_embedding_")[0] for name, _ in model.named_parameters() if ".lora_embedding_" in name}
    )
    if embeddings:
        raise ValueError(
            f"LoRA on embedding layers ({', '.join(embeddings[:2])}) cannot be proxy-tuned: leave them "
            "out of lora-target-modules"
        )


@contextmanager
def adapter_on_first_rows(model: PeftModel, rows: int, total: int) -> Iterator[None]:
    """Within the block, LoRA contributes to the first `rows` rows of the batch only; the others run the base.

    Each LoRA layer adds `lora_B(lora_A(x)) * scaling` to its base output, so zeroing lora_B's output on a row
    removes the adapter there exactly. One multiply per LoRA layer: cheaper than peft's per-sample
    `adapter_names` routing, which splits the batch in every layer.
    """
    suffix = f"lora_B.{model.active_adapter}"
    modules = [module for name, module in model.named_modules() if name.endswith(suffix)]
    if not modules:
        raise ValueError(
            "The small model has no LoRA layers with a lora_B module (only LoRA on linear layers "
            "is supported for proxy-tuning)"
        )
    mask = torch.zeros(total, 1, 1)
    mask[:rows] = 1.0
    masks: dict[tuple, torch.Tensor] = {}

    def keep_first_rows(module, inputs, output):
        key = (output.device, output.dtype)
        if key not in masks:
            masks[key] = mask.to(device=output.device, dtype=output.dtype)
        return output * masks[key].view(total, *([1] * (output.dim() - 1)))

    handles = [module.register_forward_hook(keep_first_rows) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def requested_logits(large: LogitsProvider, *args, **kwargs) -> Callable[[], tuple[torch.Tensor, Any]]:
    """`large.logits(*args, **kwargs)` started now; the returned function waits for its answer. A provider that
    computes elsewhere (`submit`: a remote service) works while this process runs the small model; a local one
    computes here and now."""
    submit = getattr(large, "submit", None)
    if submit is not None:
        return submit(*args, **kwargs).result
    answer = large.logits(*args, **kwargs)
    return lambda: answer


def proxy_step(large: LogitsProvider, small: PeftModel, alpha: float) -> StepFn:
    """Proxy-tuned next-token logits, with a KV cache for the large model and one for the merged small forward."""
    refuse_embedding_lora(small)
    caches: dict[str, Any] = {"large": None, "small": None}

    def step(input_ids, attention_mask, position_ids):
        large_answer = requested_logits(large, input_ids, attention_mask, position_ids, caches["large"], True, last=1)
        offset, caches["small"] = small_offset(
            small, large.vocab_size, input_ids, attention_mask, position_ids, caches["small"], True, last=1
        )
        large_logits, caches["large"] = large_answer()
        return proxy_logits(large_logits[:, -1], offset[:, -1].to(large_logits.device), 0.0, alpha)

    return step


def large_only_step(large: LogitsProvider) -> StepFn:
    state: dict[str, Any] = {"cache": None}

    def step(input_ids, attention_mask, position_ids):
        logits, state["cache"] = large.logits(input_ids, attention_mask, position_ids, state["cache"], True, last=1)
        return logits[:, -1]

    return step


def naive_proxy_step(large: LogitsProvider, small: PeftModel, alpha: float) -> StepFn:
    """Reference loop: three separate full forwards per token, no KV cache (what the fast path must equal)."""
    history: dict[str, torch.Tensor] = {}

    def step(input_ids, attention_mask, position_ids):
        history["ids"] = input_ids if "ids" not in history else torch.cat([history["ids"], input_ids], dim=1)
        ids, positions = history["ids"], positions_of(attention_mask)
        vocab = large.vocab_size
        large_logits, _ = large.logits(ids, attention_mask, positions, last=1)
        tuned, _ = causal_lm_logits(small, ids, attention_mask, positions)
        with small.disable_adapter():
            base, _ = causal_lm_logits(small, ids, attention_mask, positions)
        return proxy_logits(
            large_logits[:, -1],
            tuned[:, -1, :vocab].to(large_logits.device),
            base[:, -1, :vocab].to(large_logits.device),
            alpha,
        )

    return step


def proxy_generate(
    large: LogitsProvider,
    small: PeftModel,
    tokenizer,
    instructions: Sequence[str],
    *,
    alpha: float = 1.0,
    config: DecodingConfig | None = None,
    batch_size: int = 16,
    contexts: Sequence[str] | None = None,
) -> list[str]:
    """Answers of the proxy-tuned large model to instructions, in the project's prompt template.

    The Python entry point behind `fedpt-app generate`.
    """
    config = config or DecodingConfig()
    prompts = build_prompts(instructions, contexts)
    small.eval()
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        outputs += decode(proxy_step(large, small, alpha), tokenizer, prompts[start : start + batch_size], config)
    return outputs
