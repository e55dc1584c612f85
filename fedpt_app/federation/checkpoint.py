"""The server's per-round checkpoint: written atomically, read back to resume an interrupted run.

It holds what the next round depends on: the global adapter after the last completed round, that round's number,
the server's RNG states (Flower samples clients with Python's `random`) and the run config it belongs to. FedPT's
distillation carries no other state across rounds (a fresh optimizer each round, batches seeded by the round, and
a round-invariant teacher cache that is rebuilt exactly), so the adapter is its whole state too; FedPFT adds the
sub-FM's aligned FFN weights (`server_state`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used to resume."""


@dataclass
class Checkpoint:
    completed_round: int
    adapter: dict[str, torch.Tensor]
    run_config: dict[str, Any]
    finished: bool = False
    python_rng: tuple | None = None
    torch_rng: torch.Tensor | None = None
    server_state: dict[str, torch.Tensor] = field(default_factory=dict)  # an algorithm's other state (FedPFT: FFNs)

    @classmethod
    def capture(
        cls,
        completed_round: int,
        adapter: dict[str, torch.Tensor],
        run_config: dict[str, Any],
        finished: bool = False,
        server_state: dict[str, torch.Tensor] | None = None,
    ) -> Checkpoint:
        return cls(
            completed_round,
            adapter,
            run_config,
            finished,
            random.getstate(),
            torch.get_rng_state(),
            dict(server_state or {}),
        )

    def restore_rng(self) -> None:
        if self.python_rng is not None:
            random.setstate(self.python_rng)
        if self.torch_rng is not None:
            torch.set_rng_state(self.torch_rng)


def save_checkpoint(output_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write to a temporary file, fsync it, then rename over the old one: a crash mid-write leaves the previous
    checkpoint intact, never a truncated one."""
    path = output_dir / CHECKPOINT_FILE
    temporary = output_dir / f".{CHECKPOINT_FILE}.tmp"
    with temporary.open("wb") as handle:
        torch.save(
            {
                "completed_round": checkpoint.completed_round,
                "finished": checkpoint.finished,
                "adapter": dict(checkpoint.adapter),
                "run_config": checkpoint.run_config,
                "python_rng": checkpoint.python_rng,
                "torch_rng": checkpoint.torch_rng,
                "server_state": checkpoint.server_state,
            },
            handle,
        )
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(output_dir, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    return path


def load_checkpoint(output_dir: Path) -> Checkpoint | None:
    """The checkpoint in `output_dir`, or None if there is none."""
    path = output_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        raw = torch.load(path, weights_only=True)
        return Checkpoint(
            int(raw["completed_round"]),
            dict(raw["adapter"]),
            dict(raw["run_config"]),
            bool(raw["finished"]),
            _as_rng_state(raw["python_rng"]),
            raw["torch_rng"],
            dict(raw.get("server_state", {})),
        )
    except Exception as error:
        raise CheckpointError(
            f"Cannot read the checkpoint {path}: {error}. Move it away to start this output-dir afresh."
        ) from error


def _as_rng_state(state: Any) -> tuple | None:
    """`random.getstate()` is a nested tuple; a round trip through torch.save may turn tuples into lists."""
    if state is None:
        return None
    version, internal, gauss = state
    return int(version), tuple(int(value) for value in internal), gauss


def resumable_checkpoint(output_dir: Path, run_config: dict[str, Any]) -> Checkpoint | None:
    """The unfinished run's checkpoint to resume from, if `output_dir` holds one (a finished run starts afresh).

    Resuming with another config would splice two different runs, so it is refused, naming the keys that differ.
    """
    checkpoint = load_checkpoint(output_dir)
    if checkpoint is None or checkpoint.finished:
        return None
    differing = sorted(
        key
        for key in set(run_config) | set(checkpoint.run_config)
        if run_config.get(key) != checkpoint.run_config.get(key)
    )
    if differing:
        raise CheckpointError(
            f"{output_dir} holds an unfinished run (round {checkpoint.completed_round}) with "
            f"another config (differs in {differing}): rerun with its config to resume it, or "
            "choose another output-dir"
        )
    return checkpoint
