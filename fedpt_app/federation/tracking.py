"""Experiment tracking through each tool's own library (`report-to`): the run config at the start, every metrics row,
the summary at the end. Offline by default, into the run's output folder:

- `tensorboard`: event files in `<output-dir>/tensorboard/` (`tensorboard --logdir <output-dir>/tensorboard`);
- `wandb`: an offline run in `<output-dir>/wandb/` (`wandb sync` uploads it; `WANDB_MODE=online` logs live);
- `mlflow`: a SQLite store `<output-dir>/mlflow.db` with its artifacts in `<output-dir>/mlflow-artifacts/`
  (`mlflow ui --backend-store-uri sqlite:///.../mlflow.db`; `MLFLOW_TRACKING_URI` points elsewhere).

Each metrics row is logged at step = round: its numeric fields as scalars (lists and strings stay in
metrics.jsonl). The libraries are imported only when asked for.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fedpt_app.config import ConfigError

PROJECT = "fedpt-app"


class Tracker(Protocol):
    def log(self, row: dict[str, Any], step: int) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric fields (booleans and None left out)."""
    return {
        key: float(value)
        for key, value in row.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class TensorBoardTracker:
    def __init__(self, output_dir: Path, run_config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step=0: every start logs the run's rows from round 0 (a resume replays its completed rounds), so the
        # events of an earlier start, rounds a resume discarded included, are superseded instead of duplicated
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=0)
        self.writer.add_text("config", f"```\n{json.dumps(run_config, indent=2)}\n```")

    def log(self, row: dict[str, Any], step: int) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", f"```\n{json.dumps(summary, indent=2)}\n```")
        self.writer.close()


class WandbTracker:
    def __init__(self, output_dir: Path, run_config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=PROJECT,
            dir=str(output_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),
            name=output_dir.name,
            config=run_config,
            reinit="finish_previous",
        )

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log(scalars(row), step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({key: value for key, value in summary.items() if key != "final"})
        self.run.summary.update({f"final/{key}": value for key, value in scalars(summary.get("final") or {}).items()})
        self.run.finish()


class MlflowTracker:
    def __init__(self, output_dir: Path, run_config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_TRACKING_URI" in os.environ:
            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        else:  # artifacts beside the store: MLflow's default is ./mlruns in whatever folder the run started from
            mlflow.set_tracking_uri(f"sqlite:///{output_dir / 'mlflow.db'}")
            if mlflow.get_experiment_by_name(PROJECT) is None:
                mlflow.create_experiment(PROJECT, artifact_location=(output_dir / "mlflow-artifacts").as_uri())
        mlflow.set_experiment(PROJECT)
        self.run = mlflow.start_run(run_name=output_dir.name)
        mlflow.log_params({key: str(value) for key, value in run_config.items()})

    def log(self, row: dict[str, Any], step: int) -> None:
        self.mlflow.log_metrics(scalars(row), step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        self.mlflow.log_dict(summary, "summary.json")
        self.mlflow.end_run()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}  # config.REPORTERS


LIBRARIES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # what each tracker imports


def check_trackers(names: Sequence[str]) -> None:
    """Raise ConfigError if a tracker's library is not installed (before the run starts)."""
    missing = [name for name in names if importlib.util.find_spec(LIBRARIES[name]) is None]
    if missing:
        raise ConfigError(
            f'report-to={",".join(names)!r}: {", ".join(missing)} not installed; pip install -e ".[tracking]"'
        )


def trackers(names: Sequence[str], output_dir: Path, run_config: dict[str, Any]) -> list[Tracker]:
    check_trackers(names)
    return [TRACKERS[name](output_dir, run_config) for name in names]
