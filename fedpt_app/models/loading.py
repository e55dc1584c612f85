"""One loading path for every model source: built-in preset name, local folder, `.gguf` file, or hub id.

Whatever the source, the model ends up in `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained`, so the
embedded preset goes through exactly the code a user's hub model takes. Loads are cached per process, keyed by
what defines them, so a long-lived ClientApp process loads its base model once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GgufConfig, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from fedpt_app.models.packaged import (
    PACKAGED_FOLDERS,
    PACKAGED_GGUF,
    PackagedModelMissing,
    joined_gguf,
    packaged_folder,
)

transformers_logging.disable_progress_bar()  # one "Loading weights" bar per process only clutters the run log

BUILTIN_MODELS = {"tiny-small": "small", "tiny-large": "large"}
TINY_PRESET_VERSION = 3  # bumped whenever the preset's world or recipe changes: a cached older build is not reused
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# How often this process loaded each base model (the benchmark checks it stays at one per model).
LOAD_COUNTS: Counter[str] = Counter()


class ModelLoadError(RuntimeError):
    """A model reference that cannot be resolved or loaded; the message names the reference."""


def cache_root() -> Path:
    """Where built presets and dequantized GGUF models live; `FEDPT_CACHE` moves it."""
    return Path(os.environ.get("FEDPT_CACHE", Path.home() / ".cache" / "fedpt-app"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def file_lock(path: Path):
    """Serializes builds of one cache entry across processes (simulated clients start together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tiny_preset_dir(seed: int = 0) -> Path:
    """The embedded preset's folder, pre-training it on first use (a few minutes on a laptop CPU)."""
    destination = cache_root() / f"tiny-preset-v{TINY_PRESET_VERSION}-seed{seed}"
    if (destination / "report.json").exists():
        return destination
    from fedpt_app.instruct.tiny_preset import build_tiny_preset

    with file_lock(destination.with_suffix(".lock")):
        if not (destination / "report.json").exists():
            print(f"[fedpt-app] Pre-training the embedded tiny preset into {destination} (first use only)", flush=True)
            build_tiny_preset(destination, seed=seed)
    return destination


def _dequantized_gguf_dir(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once and keep it as a safetensors folder (trainable, loads in seconds)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    destination = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (destination / "config.json").exists():
        return destination
    with file_lock(destination.with_suffix(".lock")):
        if not (destination / "config.json").exists():
            folder, name = str(gguf_path.parent), gguf_path.name
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
            )
            staging = destination.with_name(destination.name + ".partial")
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, destination)
    return destination


def check_model_ref(ref: str) -> None:
    """Raise ModelLoadError, naming the reference, if it cannot resolve; builds, joins and downloads nothing (the
    built-in models are always available: they are built on first use)."""
    if ref in BUILTIN_MODELS:
        return
    try:
        if ref in PACKAGED_FOLDERS:
            packaged_folder(ref)
            return
        if ref in PACKAGED_GGUF:
            if not (cache_root() / "packaged-gguf" / f"{ref}.gguf").is_file():
                PACKAGED_GGUF[ref].part_files()
            return
    except (PackagedModelMissing, FileNotFoundError) as error:
        raise ModelLoadError(
            f"{error}"
            if isinstance(error, PackagedModelMissing)
            else f"Model {ref!r} is not installed (package {error} missing): run `fedpt-app fetch-models {ref}`"
        ) from None
    path = Path(os.path.expanduser(ref))
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF model file {ref!r} does not exist")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"Model folder {ref!r} has no config.json: it is not a transformers model folder")
        return
    if ref.startswith(("/", ".", "~")) or path.exists():
        raise ModelLoadError(f"Model path {ref!r} does not exist or is not a model folder")
    if not _HUB_ID.match(ref):
        raise ModelLoadError(
            f"Model reference {ref!r} is neither a built-in name "
            f"{sorted(BUILTIN_MODELS) + sorted(PACKAGED_GGUF) + sorted(PACKAGED_FOLDERS)}, "
            "a local folder, a .gguf file, nor a hub id like 'org/name'"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(ref, "config.json"), str):
            raise ModelLoadError(f"Hub model {ref!r} is not in the local cache and HF_HUB_OFFLINE=1 forbids downloads")


def resolve_model_ref(ref: str) -> str:
    """Map a model reference to what `from_pretrained` takes: a local folder or a hub id (checked first with
    `check_model_ref`; the built-in preset and packaged GGUF models are built or joined here, once)."""
    check_model_ref(ref)
    if ref in BUILTIN_MODELS:
        return str(tiny_preset_dir() / BUILTIN_MODELS[ref])
    if ref in PACKAGED_FOLDERS:
        return str(packaged_folder(ref))
    if ref in PACKAGED_GGUF:
        try:
            with file_lock(cache_root() / "packaged-gguf.lock"):
                gguf_path = joined_gguf(ref, cache_root() / "packaged-gguf")
        except PackagedModelMissing as error:
            raise ModelLoadError(str(error)) from None
        return str(_dequantized_gguf_dir(gguf_path))
    if ref.endswith(".gguf"):
        return str(_dequantized_gguf_dir(Path(os.path.expanduser(ref))))
    path = Path(os.path.expanduser(ref))
    return str(path) if path.is_dir() else ref


def _quantization_config(quantization: str) -> BitsAndBytesConfig | None:
    if quantization in ("none", "bf16"):
        return None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    raise ModelLoadError(f"Unknown quantization {quantization!r}; choose none, bf16, 8bit or 4bit")


@functools.cache
def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    source = resolve_model_ref(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:  # transformers raises several types for a missing or unreachable model
        raise ModelLoadError(f"Could not load the tokenizer of model {ref!r} ({source}): {error}") from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.cache
def load_causal_lm(ref: str, quantization: str = "none", spread: bool = False) -> torch.nn.Module:
    """A frozen base causal LM on the default device; 8-bit/4-bit through bitsandbytes when asked, bfloat16 weights
    with `bf16` (the default on a GPU; on a CPU with bfloat16 instructions about 4× faster than float32). `spread`
    splits it over every GPU there is (`device_map="auto"`: a large model's owner serving it whole)."""
    source = resolve_model_ref(ref)
    device = default_device()
    use_bf16 = device.type != "cpu" or quantization == "bf16"
    kwargs: dict = {"dtype": torch.bfloat16 if use_bf16 else torch.float32}
    quantization_config = _quantization_config(quantization)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    if spread and device.type == "cuda":
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as error:
        raise ModelLoadError(f"Could not load model {ref!r} ({source}): {error}") from error
    if "device_map" not in kwargs:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    LOAD_COUNTS[ref] += 1
    return model
