"""The sections of the run configuration: each a frozen dataclass of keys that checks its own values.

A section's fields are its config keys in snake_case without the section's prefix (`lora-r` is `LoraSettings.r`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from fedpt_app.serving import is_remote_ref

PARTITIONERS = ("iid", "dirichlet", "pathological")
QUANTIZATIONS = ("none", "bf16", "8bit", "4bit")
WIRE_DTYPES = ("float32", "float16")
TEACHER_CACHE_MODES = ("memory", "disk", "off")
PROXY_ADAPTERS = ("aggregate", "distilled")  # which adapter FedPT's proxy-tuned large model uses
DP_MODES = ("off", "server", "client")
REPORTERS = ("tensorboard", "wandb", "mlflow")  # fedpt_app.federation.tracking implements each


class ConfigError(ValueError):
    """A run configuration that cannot be used; raised before any training starts."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    check(value in choices, f"{key}={value!r}; choose one of {choices}")


@dataclass(frozen=True)
class Section:
    """A group of config keys. Subclasses declare fields (the keys, less `prefix`) and check them in `validate`."""

    prefix: ClassVar[str] = ""

    @classmethod
    def fields_by_key(cls) -> dict[str, str]:
        """config key -> field name"""
        return {cls.prefix + f.name.replace("_", "-"): f.name for f in fields(cls)}

    def validate(self) -> None:
        """Raise ConfigError, naming the key, for the first value out of range."""


@dataclass(frozen=True)
class DataConfig(Section):
    dataset: str = ""  # "" = the preset's
    test_dataset: str = ""
    partitioner: str = ""  # "" = the family's: pathological (instructions), dirichlet (classification labels)
    dirichlet_alpha: float = 1.0
    classes_per_partition: int = 3
    test_fraction: float = 0.1

    def validate(self) -> None:
        check(
            self.partitioner in PARTITIONERS + ("",),
            f'partitioner={self.partitioner!r}; choose one of {PARTITIONERS} (or "" for the family\'s default)',
        )
        check(self.dirichlet_alpha > 0.0, "dirichlet-alpha must be positive")
        check(self.classes_per_partition >= 1, "classes-per-partition must be at least 1")
        check(0.0 < self.test_fraction < 1.0, "test-fraction must be in (0, 1)")


@dataclass(frozen=True)
class FederationConfig(Section):
    num_server_rounds: int = 10
    fraction_train: float = 0.5
    min_train_nodes: int = 2
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies
    # reply screening (a failing reply is dropped, the others aggregate)
    max_update_norm: float = 1000.0  # L2 norm of client adapter minus broadcast adapter; 0 = no bound
    max_num_examples: int = 1_000_000
    wire_dtype: str = "float32"

    def validate(self) -> None:
        check(self.num_server_rounds >= 1, "num-server-rounds must be at least 1")
        check(0.0 < self.fraction_train <= 1.0, f"fraction-train must be in (0, 1], got {self.fraction_train}")
        check(self.min_train_nodes >= 1, "min-train-nodes must be at least 1")
        check(self.round_timeout > 0.0, f"round-timeout must be positive, got {self.round_timeout}")
        check(self.max_update_norm >= 0.0, "max-update-norm must be 0 (no bound) or positive")
        check(self.max_num_examples >= 1, "max-num-examples must be at least 1")
        check_choice("wire-dtype", self.wire_dtype, WIRE_DTYPES)


@dataclass(frozen=True)
class PrivacyConfig(Section):
    # differential privacy of the aggregate (DP-FedAvg, fixed clipping); see fedpt_app/federation/privacy.py
    dp_mode: str = "off"
    dp_clipping_norm: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_delta: float = 1e-5  # the δ of the (ε, δ) reported after every round
    dp_target_epsilon: float = 0.0  # > 0: refuse a plan that exceeds it, and stop before the round that would
    # secure aggregation with Flower's SecAgg+; see fedpt_app/federation/secure_aggregation.py
    secure_aggregation: bool = False
    secagg_num_shares: float = 1.0  # proportion of the sampled clients each key is shared with
    secagg_reconstruction_threshold: float = 0.67  # proportion of the shares needed to reconstruct a key
    secagg_max_weight: float = 1000.0  # num-examples above this overflow SecAgg+'s quantized weighting

    def validate(self) -> None:
        check_choice("dp-mode", self.dp_mode, DP_MODES)
        check(self.dp_clipping_norm > 0.0, f"dp-clipping-norm must be positive, got {self.dp_clipping_norm}")
        check(self.dp_noise_multiplier >= 0.0, "dp-noise-multiplier must be 0 or more")
        check(0.0 < self.dp_delta < 1.0, f"dp-delta must be in (0, 1), got {self.dp_delta}")
        check(self.dp_target_epsilon >= 0.0, "dp-target-epsilon must be 0 (no target) or positive")
        check(
            self.dp_target_epsilon == 0.0 or (self.dp_mode != "off" and self.dp_noise_multiplier > 0.0),
            "dp-target-epsilon needs differential privacy: set dp-mode and a positive dp-noise-multiplier",
        )
        check(
            not (self.secure_aggregation and self.dp_mode != "off"),
            "secure-aggregation=true cannot be combined with dp-mode yet (the server sees only the weighted sum)",
        )
        check(0.0 < self.secagg_num_shares <= 1.0, "secagg-num-shares must be a proportion in (0, 1]")
        check(
            0.5 < self.secagg_reconstruction_threshold <= 1.0,
            "secagg-reconstruction-threshold must be a proportion in (0.5, 1]",
        )
        check(self.secagg_max_weight > 0.0, "secagg-max-weight must be positive")


@dataclass(frozen=True)
class TrainingConfig(Section):
    """Local training on the devices."""

    local_epochs: int = 2
    local_steps: int = -1  # at most this many optimizer steps a round; 0: whole epochs; -1: the family's default
    lr: float = 3e-3
    batch_size: int = 16
    max_length: int = 96

    def validate(self) -> None:
        check(self.local_epochs >= 1, "local-epochs must be at least 1")
        check(
            self.local_steps >= -1,
            f"local-steps must be -1 (the family's default), 0 (no cap) or more, got {self.local_steps}",
        )
        check(self.lr > 0.0, f"lr must be positive, got {self.lr}")
        check(self.batch_size >= 1, "batch-size must be at least 1")
        check(self.max_length >= 8, "max-length must be at least 8")


@dataclass(frozen=True)
class LoraSettings(Section):
    prefix: ClassVar[str] = "lora-"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = ""  # comma-separated; "" = peft's per-architecture default

    def validate(self) -> None:
        check(self.r >= 1, f"lora-r must be at least 1, got {self.r}")
        check(self.alpha > 0.0, "lora-alpha must be positive")
        check(0.0 <= self.dropout < 1.0, "lora-dropout must be in [0, 1)")

    def modules(self) -> list[str] | None:
        names = [name.strip() for name in self.target_modules.split(",") if name.strip()]
        return names or None  # None: peft's per-architecture default


@dataclass(frozen=True)
class EvaluationConfig(Section):
    """Central evaluation, and where its results are reported besides metrics.jsonl."""

    eval_interval: int = 1
    eval_samples: int = 0  # 0: the whole test split (a seeded sample of this many rows otherwise)
    eval_batch_size: int = 32
    report_to: str = "none"  # comma-separated: tensorboard, wandb, mlflow (see fedpt_app/federation/tracking.py)

    def validate(self) -> None:
        check(self.eval_interval >= 0, "eval-interval must be 0 (never) or a positive number of rounds")
        check(self.eval_samples >= 0, "eval-samples must be 0 (the whole test split) or more")
        check(self.eval_batch_size >= 1, "eval-batch-size must be at least 1")
        names = [name.strip() for name in self.report_to.split(",")]
        check(
            names == ["none"] or (all(name in REPORTERS for name in names) and len(set(names)) == len(names)),
            f"report-to={self.report_to!r}; choose 'none' or a comma-separated list of {REPORTERS}",
        )

    def reporters(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.report_to.split(",") if name.strip() != "none")


@dataclass(frozen=True)
class InstructConfig(Section):
    """The instruct family (FedPT and its baselines): the model pair, proxy-tuning, distillation, decoding."""

    small_model: str = ""  # "" = the preset's
    large_model: str = ""
    large_model_quantization: str = "none"
    proxy_alpha: float = 1.0
    proxy_adapter: str = "aggregate"  # FedPT's proxy: the round's aggregate, or the adapter distilled from it
    kd_temperature: float = 1.0
    kd_steps: int = 20
    kd_lr: float = 1e-3
    kd_batch_size: int = 16
    kd_samples: int = 0  # 0: the whole server split
    teacher_cache: str = "memory"
    teacher_cache_mb: float = 2048.0
    kd_teacher_top_k: int = 0  # 0: the large model's full distribution; k: its k largest log-probs (cache, wire)
    kd_teacher_tail: str = "union"  # with a top-k teacher: the rest "union" (docs/serving.md), "uniform" or "drop"
    max_new_tokens: int = 0  # 0: enough for 95% of the server split's references

    def validate(self) -> None:
        check_choice("large-model-quantization", self.large_model_quantization, QUANTIZATIONS)
        check_choice("teacher-cache", self.teacher_cache, TEACHER_CACHE_MODES)
        check_choice("proxy-adapter", self.proxy_adapter, PROXY_ADAPTERS)
        check(self.kd_temperature > 0.0, f"kd-temperature must be positive, got {self.kd_temperature}")
        check(self.kd_steps >= 0, "kd-steps must be 0 (no distillation) or more")
        check(self.kd_lr > 0.0, f"kd-lr must be positive, got {self.kd_lr}")
        check(self.kd_batch_size >= 1, "kd-batch-size must be at least 1")
        check(self.kd_samples >= 0, "kd-samples must be 0 (the whole server split) or more")
        check(self.teacher_cache_mb >= 0.0, "teacher-cache-mb must be 0 or more")
        check(self.kd_teacher_top_k >= 0, "kd-teacher-top-k must be 0 (the full distribution) or more")
        check_choice("kd-teacher-tail", self.kd_teacher_tail, ("uniform", "drop", "union"))
        check(
            not is_remote_ref(self.large_model) or self.large_model_quantization == "none",
            f"large-model={self.large_model!r} is a remote service: its quantization is the service's "
            "(serve-logits --quantization); leave large-model-quantization='none'",
        )
        check(self.max_new_tokens >= 0, "max-new-tokens must be 0 (automatic) or more")


@dataclass(frozen=True)
class ClassifyConfig(Section):
    """The classify family (FedPFT and its baselines): the foundation model, sub-FM construction and alignment
    (FedOT's emulator distillation uses align-steps, align-lr and align-batch-size too)."""

    foundation_model: str = ""  # "" = the preset's
    compress_ratio: float = 0.75  # share of FFN neurons pruned in each compressed layer
    compressed_layers: str = ""  # comma-separated layer indices; "" = all but the first and the last
    align_before: bool = True  # layer-level distillation before FL
    align_during: bool = True  # neuron-level alignment during FL
    align_steps: int = 100  # layer-level distillation steps (before FL)
    align_lr: float = 6e-4
    align_mu: float = 0.01  # weight of the normalized W1·W2 regularizer
    align_batch_size: int = 16
    align_interval: int = 3  # rounds between neuron-level alignments (the paper: 10, over 500 rounds)
    align_proportion: float = 0.5  # share of neurons (highest APoZ) updated at an alignment
    align_round_steps: int = 20  # neuron-level distillation steps per alignment
    public_samples: int = 0  # unlabeled server texts used for distillation; 0 = the whole public split
    fedot_adapter_layers: int = 0  # per side; 0 = 2 for models of 12+ layers, else 1
    fedot_emulator_layers: int = 0  # 0 = 3 for models of 12+ layers, else half the middle layers
    fedot_lora_r: int = 0  # 0 = lora-r × layers / adapter layers: about FedPFT's trainable parameters

    def validate(self) -> None:
        check(0.0 <= self.compress_ratio < 1.0, f"compress-ratio must be in [0, 1), got {self.compress_ratio}")
        check(
            all(part.strip().isdigit() for part in self.compressed_layers.split(",") if part.strip()),
            f"compressed-layers must be comma-separated layer indices, got {self.compressed_layers!r}",
        )
        check(self.align_steps >= 0 and self.align_round_steps >= 0, "align-steps and align-round-steps must be >= 0")
        check(self.align_lr > 0.0, f"align-lr must be positive, got {self.align_lr}")
        check(self.align_mu >= 0.0, "align-mu must be 0 or more")
        check(self.align_batch_size >= 1, "align-batch-size must be at least 1")
        check(self.align_interval >= 1, "align-interval must be at least 1")
        check(0.0 < self.align_proportion <= 1.0, "align-proportion must be in (0, 1]")
        check(self.public_samples >= 0, "public-samples must be 0 (the whole public split) or more")
        check(
            self.fedot_adapter_layers >= 0 and self.fedot_emulator_layers >= 0 and self.fedot_lora_r >= 0,
            "fedot-adapter-layers, fedot-emulator-layers and fedot-lora-r must be 0 (automatic) or more",
        )

    def compressed_layer_indices(self, num_layers: int) -> list[int]:
        """The FFN layers FedPFT compresses: `compressed-layers`, or all but the first and the last."""
        if not self.compressed_layers.strip():
            if num_layers <= 2:
                raise ConfigError(
                    f"The foundation model has {num_layers} layers: all but the first and the last leaves none to "
                    "compress; name the layers to compress with compressed-layers"
                )
            return list(range(1, num_layers - 1))
        indices = sorted({int(part) for part in self.compressed_layers.split(",") if part.strip()})
        if indices[-1] >= num_layers:
            raise ConfigError(
                f"compressed-layers={self.compressed_layers!r} names layer {indices[-1]}, but the "
                f"foundation model has {num_layers} layers (0..{num_layers - 1})"
            )
        return indices
