"""The messages between ServerApp and ClientApp: record names, the round config and the reply metrics, each a typed
record converted to and from Flower records here and nowhere else.

A train message holds the adapter (`arrays`), the round config (`config`) and, for the classify family, the base
model a device lacks (`base-model`) or its changed FFN weights (`ffn-update`). A reply holds the trained adapter
(`arrays`), the reply metrics (`metrics`) and, on FedPFT's alignment rounds, the APoZ counts (`apoz`).
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


class ProtocolError(ValueError):
    """A message that does not hold what the protocol says it must."""


@dataclass(frozen=True)
class ClientBase:
    """Which base model a classify-family round trains on (a device caches bases under their id)."""

    id: str
    version: int  # bumped when the server changes the base (FedPFT's alignment)
    config_json: str = ""  # the base's HF config, sent with the base itself (BASE_MODEL_KEY)
    lora_layers: tuple[int, ...] | None = None  # LoRA only in these blocks (FedOT's adapter layers)


@dataclass(frozen=True)
class RoundConfig:
    server_round: int
    lr: float
    clipping_norm: float | None = None  # dp-mode='client': the device clips its update to this norm
    trained_model: str | None = None  # instruct family: which of the pair the devices tune, "small" or "large"
    base: ClientBase | None = None  # classify family
    count_apoz: bool | None = None  # FedPFT: count zero activations before training (alignment rounds)

    def to_record(self) -> ConfigRecord:
        entries = {"lr": self.lr, "server-round": self.server_round}
        if self.clipping_norm is not None:
            entries[CLIPPING_NORM_KEY] = self.clipping_norm
        if self.trained_model is not None:
            entries["model"] = self.trained_model
        if self.base is not None:
            entries.update({"base-id": self.base.id, "base-version": self.base.version})
            if self.base.config_json:
                entries["base-config"] = self.base.config_json
            if self.base.lora_layers is not None:
                entries["lora-layers"] = list(self.base.lora_layers)
        if self.count_apoz is not None:
            entries["count-apoz"] = self.count_apoz
        return ConfigRecord(entries)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundConfig:
        try:
            base = None
            if "base-id" in record:
                layers = record.get("lora-layers")
                base = ClientBase(
                    str(record["base-id"]),
                    int(record["base-version"]),
                    str(record.get("base-config", "")),
                    tuple(int(layer) for layer in layers) if layers else None,
                )
            count_apoz = record.get("count-apoz")
            clipping_norm = record.get(CLIPPING_NORM_KEY)
            return cls(
                int(record["server-round"]),
                float(record["lr"]),
                float(clipping_norm) if clipping_norm is not None else None,
                str(record["model"]) if "model" in record else None,
                base,
                bool(count_apoz) if count_apoz is not None else None,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ProtocolError(f"The round config {dict(record)} is not this app's: {error}") from error


@dataclass(frozen=True)
class ReplyMetrics:
    """What a device reports with its trained adapter (scalars only: no data leaves the device)."""

    num_examples: int
    train_loss: float  # mean over the round's optimizer steps
    train_seconds: float
    model_loads: int  # base-model loads in this device process so far
    peak_rss_mb: float
    cuda_peak_mb: float

    @staticmethod
    def record_keys() -> tuple[str, ...]:
        return tuple(f.name.replace("_", "-") for f in fields(ReplyMetrics))

    def to_record(self) -> MetricRecord:
        return MetricRecord(dict(zip(self.record_keys(), dataclasses.astuple(self), strict=True)))

    @classmethod
    def from_record(cls, record: MetricRecord) -> ReplyMetrics:
        """From a screened reply (see fedpt_app.federation.screening)."""
        return cls(*(record[key] for key in cls.record_keys()))
