"""Serving: the large model's logits service and its remote providers (`serve-logits`), and the OpenAI-compatible
API of a tuned run (`serve`). This file stays import-light: the config checks references with it."""

REMOTE_PREFIXES = ("http://", "https://", "openai+http://", "openai+https://")


def is_remote_ref(ref: str) -> bool:
    """A large-model reference that names a service (queried for logits) rather than weights to load."""
    return ref.startswith(REMOTE_PREFIXES)
