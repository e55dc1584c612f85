"""The messages between ServerApp and ClientApp: record names, the round config and the reply metrics, each a typed
record converted to and from Flower records here and nowhere else.

A train message holds the adapter (`arrays`), the round config (`config`) and, for the classify family, the base
model a device lacks (`base-model`) or its changed FFN weights (`ffn-update`). A reply holds the trained adapter
(`arrays`), the reply metrics (`metrics`) and, on FedPFT's alignment rounds, the APoZ counts (`apoz`). Before a node
first trains, the server asks it who it is (`query.identity`); its reply names a stable identity, which the
server's client schedule samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from flwr.app import ConfigRecord, MetricRecord
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM as CLIPPING_NORM_KEY  # fixedclipping_mod reads it

ARRAYS_KEY = "arrays"  # ArrayRecord: adapter tensors (and a classifier's head)
METRICS_KEY = "metrics"  # MetricRecord: ReplyMetrics
CONFIG_KEY = "config"  # ConfigRecord: RoundConfig
BASE_MODEL_KEY = "base-model"  # ArrayRecord: the model a client trains on, sent once per client (classify family)
FFN_UPDATE_KEY = "ffn-update"  # ArrayRecord: the sub-FM's FFN weights after a neuron-level alignment (FedPFT)
APOZ_KEY = "apoz"  # ArrayRecord in a reply: per-layer zero-activation counts ("layer-N") and "tokens" (FedPFT)
IDENTITY_QUERY = "query.identity"  # the message type that asks a node for its stable identity
IDENTITY_KEY = "identity"  # ConfigRecord in the reply: {"name": the node's identity}
MISSING_BASE = "the device lacks the client base"  # in the error of a device that must get its base again


class ProtocolError(ValueError):
    """A message that does not hold what the protocol says it must."""


@dataclass(frozen=True)
class ClientBase:
    """Which base model a classify-family round trains on (a device caches bases under their id)."""

    id: str
    version: int  # bumped when the server changes the base (FedPFT's alignment)
    config_json: str | None = None  # the base's HF config, sent with the base itself (BASE_MODEL_KEY)
    lora_layers: tuple[int, ...] | None = None  # LoRA only in these blocks (FedOT's adapter layers)
    lora_r: int | None = None  # the LoRA rank and alpha on this base when they differ from the run's (FedOT)
    lora_alpha: float | None = None


@dataclass(frozen=True)
class RoundConfig:
    server_round: int
    lr: float
    clipping_norm: float | None = None  # dp-mode='client': the device clips its update to this norm
    trained_model: str | None = None  # instruct family: which of the pair the devices tune, "small" or "large"
    prompt_budget: int | None = None  # instruct family: prompts are cut to this many tokens (max-length - generation)
    base: ClientBase | None = None  # classify family
    label_names: tuple[str, ...] | None = None  # classify family: a device's own labels map onto these by name
    count_apoz: bool | None = None  # FedPFT: count zero activations before training (alignment rounds)

    def to_record(self) -> ConfigRecord:
        entries = {"lr": self.lr, "server-round": self.server_round}
        entries.update(_entries(self, _ROUND_KEYS))
        if self.base is not None:
            entries.update(_entries(self.base, _BASE_KEYS))
            if self.base.lora_layers is not None:
                entries["lora-layers"] = list(self.base.lora_layers)
        if self.label_names is not None:
            entries["label-names"] = list(self.label_names)
        return ConfigRecord(entries)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundConfig:
        try:
            base = None
            if "base-id" in record:
                layers = record.get("lora-layers")
                base = ClientBase(
                    **_fields(record, _BASE_KEYS), lora_layers=tuple(map(int, layers)) if layers else None
                )
            labels = record.get("label-names")
            return cls(
                int(record["server-round"]),
                float(record["lr"]),
                base=base,
                label_names=tuple(map(str, labels)) if labels else None,
                **_fields(record, _ROUND_KEYS),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ProtocolError(f"The round config {dict(record)} is not this app's: {error}") from error


# field -> (record key, type) of the optional scalars; a field that is None stays out of the record
_ROUND_KEYS = {
    "clipping_norm": (CLIPPING_NORM_KEY, float),
    "trained_model": ("model", str),
    "prompt_budget": ("prompt-budget", int),
    "count_apoz": ("count-apoz", bool),
}
_BASE_KEYS = {
    "id": ("base-id", str),
    "version": ("base-version", int),
    "config_json": ("base-config", str),
    "lora_r": ("lora-r", int),
    "lora_alpha": ("lora-alpha", float),
}


def _entries(values: object, keys: dict[str, tuple[str, type]]) -> dict:
    return {key: getattr(values, name) for name, (key, _) in keys.items() if getattr(values, name) is not None}


def _fields(record: ConfigRecord, keys: dict[str, tuple[str, type]]) -> dict:
    return {name: kind(record[key]) for name, (key, kind) in keys.items() if key in record}


@dataclass(frozen=True)
class ReplyMetrics:
    """What a device reports with its trained adapter (scalars only: no data leaves the device)."""

    num_examples: int
    train_loss: float  # mean over the round's optimizer steps
    train_seconds: float
    model_loads: int  # base-model loads in this device process so far
    peak_rss_mb: float
    cuda_peak_mb: float
    rows_truncated: int  # training rows whose prompt, response or text was cut to fit max-length

    @staticmethod
    def record_keys() -> tuple[str, ...]:
        return tuple(f.name.replace("_", "-") for f in fields(ReplyMetrics))

    def to_record(self) -> MetricRecord:
        return MetricRecord(dict(zip(self.record_keys(), dataclasses.astuple(self), strict=True)))

    @classmethod
    def from_record(cls, record: MetricRecord) -> ReplyMetrics:
        """From a screened reply (see fedpt_app.federation.screening)."""
        return cls(*(record[key] for key in cls.record_keys()))
