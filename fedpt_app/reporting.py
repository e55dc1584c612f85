"""Run outputs: one JSON line per round in metrics.jsonl, a console line per round, and summary.json."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log

ROUND_LINE_FIELDS = ("train_loss", "rouge_l_small", "exact_match_small")


class MetricsLog:
    """Appends one JSON object per round to `<output-dir>/metrics.jsonl` (rewritten at the start of a run)."""

    def __init__(self, output_dir: Path, run_config: dict[str, Any]) -> None:
        self.output_dir = output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self.path.write_text("")
        (output_dir / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
        self.rows: list[dict[str, Any]] = []

    def append(self, row: dict[str, Any], num_rounds: int) -> None:
        self.rows.append(row)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        log(INFO, "%s", format_round_line(row, num_rounds))

    def write_predictions(self, model_name: str, rows: Sequence[dict[str, str]], predictions: list[str]) -> None:
        """The latest evaluation's outputs, to read what the model answers (overwritten at each evaluation)."""
        with (self.output_dir / f"predictions_{model_name}.jsonl").open("w") as handle:
            for row, prediction in zip(rows, predictions, strict=True):
                handle.write(json.dumps({"category": row["category"], "instruction": row["instruction"],
                                         "context": row.get("context", ""), "reference": row["response"],
                                         "prediction": prediction}) + "\n")

    def write_summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        evaluated = [row for row in self.rows if row.get("rouge_l_small") is not None]
        summary = {
            "rounds": max((row["round"] for row in self.rows), default=0),
            "final": evaluated[-1] if evaluated else None,
            "best_rouge_l_small": max((row["rouge_l_small"] for row in evaluated), default=None),
            "total_bytes_up": sum(row.get("bytes_up", 0) for row in self.rows),
            "total_bytes_down": sum(row.get("bytes_down", 0) for row in self.rows),
            "total_seconds": sum(row.get("round_seconds", 0.0) for row in self.rows),
            **extra,
        }
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_round_line(row: dict[str, Any], num_rounds: int) -> str:
    metrics = " | ".join(f"{name} {_format_value(row.get(name))}" for name in ROUND_LINE_FIELDS)
    return (f"[fedpt-app] round {row['round']}/{num_rounds} | {metrics} | up {row.get('bytes_up', 0) / 1e6:.2f} MB"
            f" | down {row.get('bytes_down', 0) / 1e6:.2f} MB | {row.get('round_seconds', 0.0):.1f} s")
