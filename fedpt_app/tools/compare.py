"""`fedpt-app compare`: several algorithms on the same partitions and seed, one table, one plot (Rouge-L for the
instruction-tuning algorithms, accuracy for the classification ones)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from fedpt_app.algorithms import ALGORITHMS, CLASSIFY, INSTRUCT, names
from fedpt_app.config import ConfigError
from fedpt_app.tools.simulation import run_simulation, validate_overrides

MODELS = ("small", "proxy", "large")
DASHES = {"small": "", "proxy": "", "large": "6,4", "full": "", "sub": "6,4"}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def series(rows: Sequence[dict], model: str) -> list[tuple[int, float]]:
    """(round, Rouge-L) points of one model; round 0 (untuned) counts for every curve that starts from it."""
    key = f"rouge_l_{model}"
    points = [(row["round"], row[key]) for row in rows if row.get(key) is not None]
    if model == "proxy" and rows and rows[0].get("rouge_l_large") is not None:
        points = [(0, rows[0]["rouge_l_large"])] + points  # the proxy before tuning is the large model itself
    return points


def summary_row(algorithm: str, rows: Sequence[dict]) -> dict:
    trained = [row for row in rows if row["round"] > 0]
    final = next((row for row in reversed(trained) if any(row.get(f"rouge_l_{m}") is not None for m in MODELS)), {})
    per_client = [
        ((row["bytes_up"] or 0) + (row["bytes_down"] or 0)) / max(row.get("clients", 1), 1) for row in trained
    ]
    return {
        "algorithm": algorithm,
        **{f"rouge_l_{m}": final.get(f"rouge_l_{m}") for m in MODELS},
        **{f"exact_match_{m}": final.get(f"exact_match_{m}") for m in MODELS},
        "bytes_per_client_round": sum(per_client) / len(per_client) if per_client else 0.0,
        "client_peak_rss_mb": max((row.get("client_peak_rss_mb") or 0.0 for row in trained), default=0.0),
        "client_cuda_peak_mb": max((row.get("client_cuda_peak_mb") or 0.0 for row in trained), default=0.0),
        "seconds": sum(row.get("round_seconds", 0.0) for row in rows),
    }


def _cell(value, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown_table(summaries: Sequence[dict], untuned: dict) -> str:
    lines = [
        "| algorithm | Rouge-L small | Rouge-L proxy | Rouge-L large | EM small | EM proxy | EM large | "
        "KB per client per round (up+down) | client peak RSS MB | run seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if untuned:
        lines.append(
            f"| untuned (round 0) | {_cell(untuned.get('rouge_l_small'))} | - | "
            f"{_cell(untuned.get('rouge_l_large'))} | {_cell(untuned.get('exact_match_small'))} | - | "
            f"{_cell(untuned.get('exact_match_large'))} | - | - | - |"
        )
    for s in summaries:
        lines.append(
            f"| {s['algorithm']} | "
            + " | ".join(_cell(s[f"rouge_l_{m}"]) for m in MODELS)
            + " | "
            + " | ".join(_cell(s[f"exact_match_{m}"]) for m in MODELS)
            + f" | {s['bytes_per_client_round'] / 1e3:.1f} | {s['client_peak_rss_mb']:.0f} | {s['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def accuracy_summary_row(algorithm: str, rows: Sequence[dict]) -> dict:
    trained = [row for row in rows if row["round"] > 0]
    final = next((row for row in reversed(trained) if row.get("accuracy_full") is not None), {})
    evaluated = [row["accuracy_full"] for row in trained if row.get("accuracy_full") is not None]
    return {
        "algorithm": algorithm,
        "accuracy_full": final.get("accuracy_full"),
        "accuracy_sub": final.get("accuracy_sub"),
        "best_accuracy_full": max(evaluated, default=None),
        "last3_accuracy_full": sum(evaluated[-3:]) / len(evaluated[-3:]) if evaluated else None,
        "model_bytes_down": sum(row.get("bytes_down_model") or 0 for row in trained),
        "adapter_bytes_per_client_round": sum(row["bytes_up"] for row in trained)
        / max(sum(row.get("clients", 1) for row in trained), 1),
        "alignments": sum(1 for row in trained if row.get("align_loss") is not None),
        "client_peak_rss_mb": max((row.get("client_peak_rss_mb") or 0.0 for row in trained), default=0.0),
        "seconds": sum(row.get("round_seconds", 0.0) for row in rows),
    }


def accuracy_table(summaries: Sequence[dict], untuned: dict) -> str:
    lines = [
        "| algorithm | accuracy full FM (final) | mean of the last 3 evaluations | best | "
        "accuracy on the client base (final) | "
        "model MB sent to clients (all rounds) | adapter KB per client per round (each way) | alignments | "
        "client peak RSS MB | run seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if untuned:
        lines.append(f"| untuned head (round 0) | {_cell(untuned.get('accuracy_full'))} |" + " - |" * 8)
    for s in summaries:
        lines.append(
            f"| {s['algorithm']} | {_cell(s['accuracy_full'])} | {_cell(s['last3_accuracy_full'])} | "
            f"{_cell(s['best_accuracy_full'])} | "
            f"{_cell(s['accuracy_sub'])} | {s['model_bytes_down'] / 1e6:.1f} | "
            f"{s['adapter_bytes_per_client_round'] / 1e3:.1f} | {s['alignments']} | "
            f"{s['client_peak_rss_mb']:.0f} | {s['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def svg_plot(
    curves: dict[str, list[tuple[int, float]]],
    num_rounds: int,
    width: int = 640,
    height: int = 400,
    y_label: str = "Rouge-L F1",
) -> str:
    """A plain SVG line chart of a score against rounds (no plotting dependency)."""
    left, right, top, bottom = 56, 170, 20, 44
    values = [v for points in curves.values() for _, v in points] or [0.0, 1.0]
    low, high = max(0.0, min(values) - 5), min(100.0, max(values) + 5)
    x = lambda r: left + (width - left - right) * r / max(num_rounds, 1)  # noqa: E731
    y = lambda v: top + (height - top - bottom) * (1 - (v - low) / max(high - low, 1e-9))  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
        f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">round</text>',
        f'<text x="14" y="{(top + height - bottom) / 2}" transform="rotate(-90 14 {(top + height - bottom) / 2})" '
        f'text-anchor="middle">{y_label}</text>',
    ]
    for r in range(num_rounds + 1):
        parts.append(f'<text x="{x(r):.1f}" y="{height - bottom + 16}" text-anchor="middle">{r}</text>')
    for tick in range(5):
        v = low + (high - low) * tick / 4
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    for index, (label, points) in enumerate(curves.items()):
        algorithm, model = label.split(" / ")
        color, dash = ALGORITHMS[algorithm].color, DASHES[model]
        path = " ".join(f"{x(r):.1f},{y(v):.1f}" for r, v in points)
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>'
        )
        legend_y = top + 16 * index + 8
        parts.append(
            f'<line x1="{width - right + 10}" y1="{legend_y}" x2="{width - right + 34}" y2="{legend_y}" '
            f'stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>'
        )
        parts.append(f'<text x="{width - right + 40}" y="{legend_y + 4}">{label}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def run_comparison(algorithms: Sequence[str], run_config: str, output: Path, num_supernodes: int = 4) -> bool:
    unknown = [name for name in algorithms if name not in ALGORITHMS]
    if unknown or not algorithms:
        raise ConfigError(f"Unknown algorithm(s) {unknown}; choose from {names()}")
    if len({ALGORITHMS[name].family for name in algorithms}) > 1:
        raise ConfigError(
            f"compare either instruction-tuning algorithms {names(INSTRUCT)} or classification "
            f"ones {names(CLASSIFY)}, not both: they are scored differently"
        )
    if "algorithm=" in run_config or "output-dir=" in run_config:
        raise ConfigError("compare sets 'algorithm' and 'output-dir' itself; leave them out of --run-config")
    output = output.expanduser().resolve()
    runs = {name: output / name for name in algorithms}
    for name, run_dir in runs.items():  # validate every configuration before the first run starts
        validate_overrides(f"{run_config} algorithm='{name}' output-dir='{run_dir}'")
    all_ok = True
    for name, run_dir in runs.items():
        print(f"[fedpt-app compare] running {name} -> {run_dir}", flush=True)
        outcome = run_simulation(
            f"{run_config} algorithm='{name}' output-dir='{run_dir}'", num_supernodes=num_supernodes
        )
        if not outcome.succeeded:
            print(f"[fedpt-app compare] {name} ended as {outcome.status}: {outcome.details}", flush=True)
            all_ok = False
    finished = {name: read_metrics(d) for name, d in runs.items() if (d / "summary.json").exists()}
    write_report(finished, output, validate_overrides(f"{run_config} algorithm='{algorithms[0]}'").num_server_rounds)
    return all_ok


def write_report(metrics: dict[str, list[dict]], output: Path, num_rounds: int) -> None:
    if any(ALGORITHMS[name].family.name == CLASSIFY for name in metrics):
        return write_accuracy_report(metrics, output, num_rounds)
    untuned: dict = {}
    for rows in metrics.values():
        untuned |= {k: v for k, v in rows[0].items() if k.startswith(("rouge_l_", "exact_match_")) and v is not None}
    summaries = [summary_row(name, rows) for name, rows in metrics.items()]
    table = markdown_table(summaries, untuned)
    curves = {
        f"{name} / {model}": series(rows, model)
        for name, rows in metrics.items()
        for model in MODELS
        if len(series(rows, model)) > 1
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "comparison.md").write_text(table)
    (output / "comparison.json").write_text(json.dumps(summaries, indent=2) + "\n")
    (output / "rouge_l.svg").write_text(svg_plot(curves, num_rounds))
    print(table)
    print(f"[fedpt-app compare] wrote {output / 'comparison.md'} and {output / 'rouge_l.svg'}")


def write_accuracy_report(metrics: dict[str, list[dict]], output: Path, num_rounds: int) -> None:
    untuned = {"accuracy_full": next(iter(metrics.values()))[0].get("accuracy_full")} if metrics else {}
    summaries = [accuracy_summary_row(name, rows) for name, rows in metrics.items()]
    table = accuracy_table(summaries, untuned)
    curves = {
        f"{name} / {model}": [
            (row["round"], row[f"accuracy_{model}"]) for row in rows if row.get(f"accuracy_{model}") is not None
        ]
        for name, rows in metrics.items()
        for model in ("full", "sub")
    }
    curves = {label: points for label, points in curves.items() if len(points) > 1}
    output.mkdir(parents=True, exist_ok=True)
    (output / "comparison.md").write_text(table)
    (output / "comparison.json").write_text(json.dumps(summaries, indent=2) + "\n")
    (output / "accuracy.svg").write_text(svg_plot(curves, num_rounds, y_label="accuracy (%)"))
    print(table)
    print(f"[fedpt-app compare] wrote {output / 'comparison.md'} and {output / 'accuracy.svg'}")
