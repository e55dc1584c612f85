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


def _base_file(base_id: str) -> Path:
    """The base's weights as received: the same for every device (the id names the content)."""
    return cache_root() / "client-bases" / f"{base_id}.pt"


def _device_file(owner: str, base_id: str) -> Path:
    """What this device holds of the base (its version and the FFN weights of the last update), under its own name:
    simulated devices on one machine share the model cache."""
    return cache_root() / "client-bases" / owner / f"{base_id}.pt"


def receive_base(msg: Message, base: ClientBase, lora: LoraSettings, seed: int, owner: str) -> PeftModel:
    """The peft model on this round's base: as received now, kept from an earlier round, or from the device's
    model cache; FFN updates applied. Raises MissingBaseError if the device has no copy of it."""
    current = _BASE.get("current")
    if BASE_MODEL_KEY in msg.content:
        package = ModelPackage.from_record(base.config_json, msg.content[BASE_MODEL_KEY])
        _save(_base_file(base.id), {"config_json": package.config_json, "state": dict(package.state)})
        _save(_device_file(owner, base.id), {"version": 0, "ffn": {}})
        current = None
    if current is None or current[0] != base.id or (current[1] != base.version and FFN_UPDATE_KEY not in msg.content):
        current = _load_stored(base, lora, seed, owner)  # e.g. another node of this process got an update
    model = current[2]
    if FFN_UPDATE_KEY in msg.content:  # whole FFN tensors: they replace whatever version the model had
        ffn = dict(from_array_record(msg.content[FFN_UPDATE_KEY]))
        _apply_ffn(model, ffn)
        _save(_device_file(owner, base.id), {"version": base.version, "ffn": ffn})
        current = (base.id, base.version, model)
    if current[1] != base.version:
        raise MissingBaseError(
            f"{MISSING_BASE}: this device holds version {current[1]} of base {base.id}; the server trains on "
            f"version {base.version} and sent no update"
        )
    _BASE["current"] = current
    return model


def _save(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")  # an atomic replace: readers never see half a file
    torch.save(content, temporary)
    temporary.replace(path)


def _load_stored(base: ClientBase, lora: LoraSettings, seed: int, owner: str) -> tuple[str, int, PeftModel]:
    weights, held = _base_file(base.id), _device_file(owner, base.id)
    if not (weights.exists() and held.exists()):
        raise MissingBaseError(
            f"{MISSING_BASE}: this device has no copy of base model {base.id} (looked in {held} and {weights}); the "
            "server sends it again with the next round this device is sampled in"
        )
    saved, state = torch.load(weights, weights_only=True), torch.load(held, weights_only=True)
    model = ModelPackage(saved["config_json"], saved["state"]).build()
    LOAD_COUNTS[base.id] += 1
    spec = LoraSpec.from_settings(lora)
    if base.lora_r is not None:  # the algorithm rescaled the run's LoRA on this base (FedOT)
        spec = dataclasses.replace(spec, r=base.lora_r, alpha=base.lora_alpha)
    peft_model = lora_classifier(model, spec, seed, layers=list(base.lora_layers) if base.lora_layers else None)
    if state["ffn"]:
        _apply_ffn(peft_model, state["ffn"])
    return base.id, int(state["version"]), peft_model


def _apply_ffn(model: PeftModel, ffn: dict[str, torch.Tensor]) -> None:
    base = model.get_base_model()
    unexpected = set(ffn) - set(dict(base.named_parameters()))
    if unexpected:
        raise ValueError(f"FFN update names tensors this base does not have: {sorted(unexpected)[:3]}")
    base.load_state_dict(ffn, strict=False)
