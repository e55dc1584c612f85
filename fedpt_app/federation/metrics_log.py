"""Run outputs: one JSON line per round in metrics.jsonl, a console line per round, summary.json, the run's plots
(plots/), and the same rows in the experiment trackers of `report-to`."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from fedpt_app.federation.tracking import trackers
from fedpt_app.plots import write_run_plots


class MetricsLog:
    """Appends one JSON object per round to `<output-dir>/metrics.jsonl`.

    A new run starts the file afresh; a resumed run keeps the rows of its completed rounds (dropping any row that
    the interrupted run wrote after its last checkpoint). `score_names` are the algorithm's headline scores
    (a round with any of them was evaluated); `line_fields` are the values the console line shows when present;
    `report_to` names the trackers that receive every row too (fedpt_app.federation.tracking).
    """

    def __init__(
        self,
        output_dir: Path,
        run_config: dict[str, Any],
        keep_rounds_upto: int = 0,
        score_names: Sequence[str] = (),
        line_fields: Sequence[str] = (),
        report_to: Sequence[str] = (),
    ) -> None:
        self.output_dir = output_dir
        self.run_config = run_config
        self.score_names, self.line_fields = tuple(score_names), tuple(line_fields)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if keep_rounds_upto and self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [row for row in rows if row["round"] <= keep_rounds_upto]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        (output_dir / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
        self.trackers = trackers(report_to, output_dir, run_config)
        for row in self.rows:  # a resumed run's trackers start from its completed rounds
            self._track(row)

    def _track(self, row: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(row, step=row["round"])

    def append(self, row: dict[str, Any], num_rounds: int) -> None:
        self.rows.append(row)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        self._track(row)
        log(INFO, "%s", format_round_line(row, num_rounds, self.line_fields))

    def write_summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        evaluated = [
            row for row in self.rows if row["round"] > 0 and any(row.get(name) is not None for name in self.score_names)
        ]
        summary = {  # the final evaluation, never the best round: that would pick a model on the test set
            "rounds": max((row["round"] for row in self.rows), default=0),
            "final": evaluated[-1] if evaluated else None,
            "total_bytes_up": sum(row.get("bytes_up") or 0 for row in self.rows),
            "total_bytes_down": sum(row.get("bytes_down") or 0 for row in self.rows),
            "total_seconds": sum(row.get("round_seconds", 0.0) for row in self.rows),
            **extra,
        }
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for tracker in self.trackers:
            tracker.finish(summary)
        write_run_plots(self.rows, self.output_dir / "plots")
        return summary


def _format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def framework_seconds(row: dict[str, Any]) -> float:
    """A round's time outside the slowest client's training, the server step and the central evaluation: message
    passing, serialization, scheduling and, in deployment, each ClientApp task's process start, imports and load."""
    return (
        row["round_seconds"]
        - row.get("client_train_seconds", 0.0)
        - row.get("server_step_seconds", 0.0)
        - row["eval_seconds"]
    )


def _megabytes(count: int | None) -> str:
    return "- MB (not counted)" if count is None else f"{count / 1e6:.2f} MB"


def format_round_line(row: dict[str, Any], num_rounds: int, fields: Sequence[str]) -> str:
    metrics = " | ".join(f"{name} {_format_value(row.get(name))}" for name in fields if row.get(name) is not None)
    return (
        f"[fedpt-app] round {row['round']}/{num_rounds} | {metrics} | up {_megabytes(row.get('bytes_up'))}"
        f" | down {_megabytes(row.get('bytes_down'))} | {row.get('round_seconds', 0.0):.1f} s"
    )
