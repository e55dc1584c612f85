"""The pair's large model as a `LogitsProvider`: its weights loaded in this process, or a service over the network."""

from __future__ import annotations

from fedpt_app.instruct.proxy import LocalLogitsProvider, LogitsProvider, shared_vocab_size
from fedpt_app.models.loading import load_tokenizer
from fedpt_app.serving import is_remote_ref


def load_logits_provider(
    small_ref: str, large_ref: str, quantization: str = "none", small_tokenizer=None
) -> LogitsProvider:
    """Checked against the small model's tokenizer before any training: by the configs for a local model, by
    the service's vocabulary fingerprint for a remote one (a URL, its token from FEDPT_LOGITS_TOKEN)."""
    if is_remote_ref(large_ref):
        from fedpt_app.serving.remote import remote_provider  # httpx: only where a service is used

        return remote_provider(large_ref, small_tokenizer or load_tokenizer(small_ref))
    return LocalLogitsProvider(large_ref, shared_vocab_size(small_ref, large_ref), quantization)
