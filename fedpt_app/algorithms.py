"""The one table of algorithms: name -> method family, server strategy, one-line description.

Two families share the federation core: **instruct** (FedPT and its baselines: instruction tuning of a causal-LM
pair) and **classify** (FedPFT and its baselines: text classification with a foundation model). A family owns its
device task, the code a ClientApp runs for a train message. Strategies and device tasks are named by import path
and imported on demand, so a device process never imports a server strategy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

INSTRUCT, CLASSIFY = "instruct", "classify"


@dataclass(frozen=True)
class Family:
    name: str
    device_task: str  # module with `train(msg, context, config)` (and `adapter_keys` where secure aggregation runs)
    secure_aggregation: bool  # whether SecAgg+ is supported for this family's algorithms
    local_steps: int = 0  # the cap on a client's optimizer steps per round when local-steps=-1 (0: whole epochs)


@dataclass(frozen=True)
class Algorithm:
    name: str
    family: Family
    strategy: str  # "module:Class", imported by the ServerApp only
    description: str
    color: str  # its line in comparison plots
    aligns_during_fl: bool = False  # changes the clients' base model during FL (FedPFT's neuron-level alignment)
    tunes_large_weights: bool = False  # needs the large model's weights, not only its logits (FedAvg-large)


FAMILIES = {
    INSTRUCT: Family(INSTRUCT, "fedpt_app.instruct.device_task", secure_aggregation=True),
    # classification: a first result in minutes (the paper-scale whole epochs are local-steps=0)
    CLASSIFY: Family(CLASSIFY, "fedpt_app.classify.device_task", secure_aggregation=False, local_steps=50),
}

_INSTRUCT, _CLASSIFY = FAMILIES[INSTRUCT], FAMILIES[CLASSIFY]
ALGORITHMS: dict[str, Algorithm] = {
    algorithm.name: algorithm
    for algorithm in (
        Algorithm(
            "fedavg",
            _INSTRUCT,
            "fedpt_app.instruct.strategies.fedavg:FedAvgSmall",
            "FedAvg of the small model's LoRA adapter",
            "#1f77b4",
        ),
        Algorithm(
            "fedavg-pt",
            _INSTRUCT,
            "fedpt_app.instruct.strategies.fedavg_pt:FedAvgProxyTuning",
            "FedAvg of the small model's adapter, evaluated as a proxy-tuned large model",
            "#ff7f0e",
        ),
        Algorithm(
            "fedpt",
            _INSTRUCT,
            "fedpt_app.instruct.strategies.fedpt:FedPT",
            "FedAvg of the small model's adapter, proxy-tuned large model distilled back into it",
            "#d62728",
        ),
        Algorithm(
            "fedavg-large",
            _INSTRUCT,
            "fedpt_app.instruct.strategies.fedavg_large:FedAvgLarge",
            "FedAvg of the large model's own LoRA adapter (the white-box reference)",
            "#2ca02c",
            tunes_large_weights=True,
        ),
        Algorithm(
            "fedpetuning",
            _CLASSIFY,
            "fedpt_app.classify.strategies.fedpetuning:FedPETuning",
            "LoRA on the full foundation model",
            "#2ca02c",
        ),
        Algorithm(
            "fedpft",
            _CLASSIFY,
            "fedpt_app.classify.strategies.fedpft:FedPFT",
            "LoRA on a pruned, aligned sub-FM, plugged into the full FM",
            "#d62728",
            aligns_during_fl=True,
        ),
        Algorithm(
            "fedot",
            _CLASSIFY,
            "fedpt_app.classify.strategies.fedot:FedOT",
            "Offsite-tuning: adapter layers around a layer-dropped emulator",
            "#1f77b4",
        ),
    )
}
DEFAULT_ALGORITHM = "fedpt"


def names(family: str | None = None) -> tuple[str, ...]:
    """The algorithm names, all or one family's, in table order."""
    return tuple(name for name, algorithm in ALGORITHMS.items() if family in (None, algorithm.family.name))


def strategy_class(name: str) -> type:
    module, _, attribute = ALGORITHMS[name].strategy.partition(":")
    return getattr(importlib.import_module(module), attribute)


def device_task(name: str) -> ModuleType:
    """The device-task module of an algorithm's family."""
    return importlib.import_module(ALGORITHMS[name].family.device_task)
