"""Typed, validated run configuration: every config key, grouped in sections that validate themselves.

Keys are spelled as in `[tool.flwr.app.config]` (kebab-case; Flower passes them as one flat mapping). A section's
fields are its keys in snake_case without the section's prefix: `lora-r` is `config.lora.r`, `kd-steps` is
`config.instruct.kd_steps`. A `preset` fills the model and dataset keys that are left empty ("").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedpt_app.algorithms import ALGORITHMS, DEFAULT_ALGORITHM, INSTRUCT, Algorithm, Family
from fedpt_app.config.sections import (
    DP_MODES,
    PARTITIONERS,
    QUANTIZATIONS,
    REPORTERS,
    TEACHER_CACHE_MODES,
    WIRE_DTYPES,
    ClassifyConfig,
    ConfigError,
    DataConfig,
    EvaluationConfig,
    FederationConfig,
    InstructConfig,
    LoraSettings,
    PrivacyConfig,
    Section,
    TrainingConfig,
    check,
    check_choice,
)
from fedpt_app.presets import PRESETS
from fedpt_app.serving import is_remote_ref

__all__ = [
    "DP_MODES",
    "PARTITIONERS",
    "QUANTIZATIONS",
    "REPORTERS",
    "TEACHER_CACHE_MODES",
    "WIRE_DTYPES",
    "ClassifyConfig",
    "ConfigError",
    "DataConfig",
    "EvaluationConfig",
    "FederationConfig",
    "InstructConfig",
    "LoraSettings",
    "PrivacyConfig",
    "RunConfig",
    "Section",
    "TrainingConfig",
    "check",
    "default_output_root",
]


@dataclass(frozen=True)
class RunConfig:
    algorithm: str = DEFAULT_ALGORITHM
    preset: str = "tiny"
    output_dir: str = ""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)

    # ---- construction -----------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [*TOP_LEVEL_KEYS, *(key for section in SECTIONS.values() for key in section.fields_by_key())]

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build and validate a config from `context.run_config` (or any key -> value mapping)."""
        valid = cls.keys()
        unknown = sorted(set(raw) - set(valid))
        if unknown:
            raise ConfigError(f"Unknown config key(s) {unknown}. Valid keys: {', '.join(valid)}")
        top = {
            name: _coerce(key, raw[key], type_name) for key, (name, type_name) in TOP_LEVEL_KEYS.items() if key in raw
        }
        config = cls(**top)
        check_choice("algorithm", config.algorithm, tuple(ALGORITHMS))
        check(config.preset in PRESETS, f"preset={config.preset!r}; choose one of {sorted(PRESETS)}")
        check(
            config.output_dir == "" or os.path.isabs(os.path.expanduser(config.output_dir)),
            f"output-dir must be an absolute path (or empty for the default), got {config.output_dir!r}",
        )
        preset = PRESETS[config.preset].fills(config.family.name)
        filled = {key: value for key, value in preset.items() if raw.get(key, "") == ""}
        sections = {name: _build_section(section, {**raw, **filled}) for name, section in SECTIONS.items()}
        config = dataclasses.replace(config, **sections)
        config._check_family()
        return config

    def _check_family(self) -> None:
        check(
            not self.privacy.secure_aggregation or self.family.secure_aggregation,
            f"secure-aggregation is not supported for {self.algorithm} yet",
        )
        if self.family.name == INSTRUCT:
            check(
                self.instruct.small_model != "" and self.instruct.large_model != "" and self.data.dataset != "",
                f"preset={self.preset!r} has no instruction-tuning models: choose another preset or set "
                f"small-model, large-model and dataset",
            )
            check(
                not (self.method.tunes_large_weights and is_remote_ref(self.instruct.large_model)),
                f"{self.algorithm} tunes the large model's weights; large-model={self.instruct.large_model!r} is a "
                "remote service that only answers with logits",
            )
            return
        check(
            self.classify.foundation_model != "" and self.data.dataset != "",
            f"preset={self.preset!r} has no classification model and data: set foundation-model and dataset, "
            f"or use preset='minilm-rt'",
        )
        check(
            self.federation.wire_dtype == "float32"
            or not self.classify.align_during
            or not self.method.aligns_during_fl,
            f"{self.algorithm}'s aligned FFN weights travel as float32; use wire-dtype='float32'",
        )

    # ---- views ------------------------------------------------------------------------------------------
    @property
    def method(self) -> Algorithm:
        return ALGORITHMS[self.algorithm]

    @property
    def family(self) -> Family:
        return self.method.family

    def to_mapping(self) -> dict[str, Any]:
        """config key -> value, as Flower passes a run config."""
        mapping = {key: getattr(self, name) for key, (name, _) in TOP_LEVEL_KEYS.items()}
        for name, section in SECTIONS.items():
            values = getattr(self, name)
            mapping.update({key: getattr(values, field_name) for key, field_name in section.fields_by_key().items()})
        return mapping

    def flat(self) -> dict[str, Any]:
        """field name (snake_case) -> value over every key: config.json and the checkpoint's identity."""
        return {key.replace("-", "_"): value for key, value in self.to_mapping().items()}

    # ---- derived values ---------------------------------------------------------------------------------
    def local_step_cap(self) -> int | None:
        """The most optimizer steps a client takes in a round (None: every batch of local-epochs epochs)."""
        steps = self.training.local_steps if self.training.local_steps != -1 else self.family.local_steps
        return steps or None

    def round_lr(self, server_round: int) -> float:
        """Linear decay over rounds: lr_r = lr_0 * (R - r) / R for rounds r = 0 .. R-1."""
        rounds = self.federation.num_server_rounds
        return self.training.lr * (rounds - (server_round - 1)) / rounds

    def output_path(self) -> Path:
        if self.output_dir:
            return Path(os.path.expanduser(self.output_dir))
        return default_output_root() / f"{self.algorithm}-{self.preset}-seed{self.seed}"


TOP_LEVEL_KEYS = {
    "algorithm": ("algorithm", "str"),
    "preset": ("preset", "str"),
    "output-dir": ("output_dir", "str"),
    "seed": ("seed", "int"),
}  # key -> (field, type)
SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig,
    "federation": FederationConfig,
    "privacy": PrivacyConfig,
    "training": TrainingConfig,
    "lora": LoraSettings,
    "evaluation": EvaluationConfig,
    "instruct": InstructConfig,
    "classify": ClassifyConfig,
}


def _build_section(section: type[Section], raw: Mapping[str, Any]) -> Section:
    types = {f.name: f.type for f in fields(section)}
    values = {name: _coerce(key, raw[key], types[name]) for key, name in section.fields_by_key().items() if key in raw}
    built = section(**values)
    built.validate()
    return built


def default_output_root() -> Path:
    return Path(os.environ.get("FEDPT_OUTPUT_ROOT", Path.home() / "fedpt-app-runs")).expanduser().absolute()


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
