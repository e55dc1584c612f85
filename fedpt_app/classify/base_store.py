"""A device's copy of the classify family's client base (the full FM, the sub-FM or the emulator).

The base arrives once, with the first round this device is sampled in, and is kept in the process and in the
device's model cache (a deployed ClientApp runs each round in a fresh process); FedPFT's aligned FFN weights arrive
the same way when they change.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from flwr.app import Message
from peft import PeftModel

from fedpt_app.classify.models import ModelPackage, lora_classifier
from fedpt_app.config import LoraSettings
from fedpt_app.models.loading import LOAD_COUNTS, cache_root
from fedpt_app.models.lora import LoraSpec, from_array_record
from fedpt_app.protocol import BASE_MODEL_KEY, FFN_UPDATE_KEY, MISSING_BASE, ClientBase


class MissingBaseError(RuntimeError):
    """The server assumed this device holds a base model it does not have; the server sends it again when the
    error names MISSING_BASE."""


# This process's current base: (base id, version, peft model). One at a time: a device trains one run's base.
_BASE: dict[str, tuple[str, int, PeftModel]] = {}


def _stored(owner: str, base_id: str) -> Path:
    """This device's copy, under its own name: simulated nodes on one machine share the model cache."""
    return cache_root() / "client-bases" / owner / f"{base_id}.pt"


def receive_base(msg: Message, base: ClientBase, lora: LoraSettings, seed: int, owner: str) -> PeftModel:
    """The peft model on this round's base: as received now, kept from an earlier round, or from the device's
    model cache; FFN updates applied. Raises MissingBaseError if the device has no copy of it."""
    current = _BASE.get("current")
    if BASE_MODEL_KEY in msg.content:
        package = ModelPackage.from_record(base.config_json, msg.content[BASE_MODEL_KEY])
        _store(
            owner, base.id, {"config_json": package.config_json, "state": dict(package.state), "ffn": {}, "version": 0}
        )
        current = None
    if current is None or current[0] != base.id or (current[1] != base.version and FFN_UPDATE_KEY not in msg.content):
        current = _load_stored(base, lora, seed, owner)  # e.g. another node of this process got an update
    model = current[2]
    if FFN_UPDATE_KEY in msg.content:
        ffn = dict(from_array_record(msg.content[FFN_UPDATE_KEY]))
        _apply_ffn(model, ffn)
        saved = torch.load(_stored(owner, base.id), weights_only=True)
        _store(owner, base.id, {**saved, "ffn": ffn, "version": base.version})
        current = (base.id, base.version, model)
    if current[1] != base.version:
        raise MissingBaseError(
            f"{MISSING_BASE}: this device holds version {current[1]} of base {base.id}; the server trains on "
            f"version {base.version} and sent no update"
        )
    _BASE["current"] = current
    return model


def _store(owner: str, base_id: str, content: dict) -> None:
    path = _stored(owner, base_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")  # simulated nodes on one machine share the cache
    torch.save(content, temporary)
    temporary.replace(path)


def _load_stored(base: ClientBase, lora: LoraSettings, seed: int, owner: str) -> tuple[str, int, PeftModel]:
    path = _stored(owner, base.id)
    if not path.exists():
        raise MissingBaseError(
            f"{MISSING_BASE}: this device has no copy of base model {base.id} (looked in {path}); the server "
            "sends it again with the next round this device is sampled in"
        )
    saved = torch.load(path, weights_only=True)
    model = ModelPackage(saved["config_json"], saved["state"]).build()
    LOAD_COUNTS[base.id] += 1
    spec = LoraSpec.from_settings(lora)
    if base.lora_r is not None:  # the algorithm rescaled the run's LoRA on this base (FedOT)
        spec = dataclasses.replace(spec, r=base.lora_r, alpha=base.lora_alpha)
    peft_model = lora_classifier(model, spec, seed, layers=list(base.lora_layers) if base.lora_layers else None)
    if saved["ffn"]:
        _apply_ffn(peft_model, saved["ffn"])
    return base.id, int(saved["version"]), peft_model


def _apply_ffn(model: PeftModel, ffn: dict[str, torch.Tensor]) -> None:
    base = model.get_base_model()
    unexpected = set(ffn) - set(dict(base.named_parameters()))
    if unexpected:
        raise ValueError(f"FFN update names tensors this base does not have: {sorted(unexpected)[:3]}")
    base.load_state_dict(ffn, strict=False)
