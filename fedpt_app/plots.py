"""Plots with matplotlib: a run's own (scores per model, traffic and the time split per round, in
`<output-dir>/plots/`) and a comparison's (mean over seeds with a ±1 std band per round, and the final table as
bars with error bars)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpt_app.algorithms import ALGORITHMS

LABELS = {
    "rouge_l": "Rouge-L F1 (%)",
    "exact_match": "exact match (%)",
    "contains": "answer contains the reference (%)",
    "accuracy": "accuracy (%)",
}
SCORE_METRICS = ("rouge_l", "exact_match", "contains", "accuracy")
LINE_STYLES = {"small": "-", "proxy": "-", "large": "--", "full": "-", "sub": "--"}
MARKERS = {"small": "o", "proxy": "s", "large": "^", "full": "o", "sub": "^"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, bbox_inches="tight")  # an outside legend may be wider than the axes
    figure.clf()
    _pyplot().close(figure)
    return path


# ---- one run --------------------------------------------------------------------------------------------------------
def series(rows: Sequence[dict], metric: str, model: str) -> dict[int, float]:
    """round -> score of one model in one run; the proxy's round 0 is the untuned large model it starts from."""
    key = f"{metric}_{model}"
    points = {row["round"]: row[key] for row in rows if row.get(key) is not None}
    untuned_large = rows[0].get(f"{metric}_large") if rows and rows[0]["round"] == 0 else None
    if model == "proxy" and points and untuned_large is not None:
        points[0] = untuned_large
    return dict(sorted(points.items()))


def _models(rows: Sequence[dict], metric: str) -> list[str]:
    return sorted(
        {
            key[len(metric) + 1 :]
            for row in rows
            for key, value in row.items()
            if key.startswith(f"{metric}_") and value is not None
        }
    )


def write_run_plots(rows: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """scores.png (every model's scores against rounds), traffic.png and time.png (per round)."""
    if not rows:
        return []
    pyplot = _pyplot()
    metrics = [metric for metric in SCORE_METRICS if _models(rows, metric)]
    figure, axes = pyplot.subplots(
        1, max(len(metrics), 1), figsize=(5.5 * max(len(metrics), 1), 4), dpi=110, squeeze=False
    )
    for axis, metric in zip(axes[0], metrics, strict=False):
        for model in _models(rows, metric):
            points = series(rows, metric, model)
            axis.plot(
                list(points),
                list(points.values()),
                LINE_STYLES.get(model, "-"),
                marker=MARKERS.get(model, "o"),
                markersize=4,
                label=model,
            )
        axis.set_xlabel("round")
        axis.set_ylabel(LABELS[metric])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{rows[0].get('algorithm', '')}: scores per round")
    paths = [_save(figure, folder / "scores.png")]
    trained = [row for row in rows if row["round"] > 0]
    if trained:
        paths += [_traffic(trained, folder / "traffic.png"), _time_split(trained, folder / "time.png")]
    return paths


def _traffic(rows: Sequence[dict], path: Path) -> Path:
    pyplot = _pyplot()
    figure, axis = pyplot.subplots(figsize=(7, 4), dpi=110)
    rounds = [row["round"] for row in rows]
    up = [(row.get("bytes_up") or 0) / 1e6 for row in rows]
    down = [(row.get("bytes_down") or 0) / 1e6 for row in rows]
    axis.bar([r - 0.2 for r in rounds], down, width=0.4, label="down (server to clients)")
    axis.bar([r + 0.2 for r in rounds], up, width=0.4, label="up (clients to server)")
    axis.set_xlabel("round")
    axis.set_ylabel("MB, all clients of the round")
    axis.set_ylim(0, max([*up, *down, 1e-6]) * 1.35)  # room for the legend above the bars
    axis.set_title("traffic per round")
    axis.legend(fontsize=8)
    return _save(figure, path)


def _time_split(rows: Sequence[dict], path: Path) -> Path:
    pyplot = _pyplot()
    figure, axis = pyplot.subplots(figsize=(7, 4), dpi=110)
    rounds = [row["round"] for row in rows]
    parts = {
        "local training (slowest client)": [row.get("client_train_seconds", 0.0) for row in rows],
        "server step": [row.get("server_step_seconds", 0.0) for row in rows],
        "evaluation": [row.get("eval_seconds", 0.0) for row in rows],
    }
    parts["framework (the rest)"] = [
        max(row.get("round_seconds", 0.0) - sum(part[i] for part in parts.values()), 0.0) for i, row in enumerate(rows)
    ]
    bottom = [0.0] * len(rows)
    for label, seconds in parts.items():
        axis.bar(rounds, seconds, bottom=bottom, label=label)
        bottom = [b + s for b, s in zip(bottom, seconds, strict=True)]
    axis.set_xlabel("round")
    axis.set_ylabel("seconds")
    axis.set_ylim(0, max([*bottom, 1e-6]) * 1.35)
    axis.set_title("where each round's time goes")
    axis.legend(fontsize=8)
    return _save(figure, path)


# ---- a comparison ---------------------------------------------------------------------------------------------------
def band(runs: Sequence[Sequence[dict]], metric: str, model: str) -> tuple[list[int], list[float], list[float]]:
    """(rounds every seed evaluated, mean, std) of one model over the seeds."""
    per_seed = [series(rows, metric, model) for rows in runs]
    rounds = sorted(set.intersection(*(set(points) for points in per_seed))) if per_seed else []
    means = [statistics.fmean(points[r] for points in per_seed) for r in rounds]
    stds = [statistics.stdev(points[r] for points in per_seed) if len(per_seed) > 1 else 0.0 for r in rounds]
    return rounds, means, stds


def line_colors(names: Sequence[str]) -> dict[str, str]:
    """Each algorithm's own colour; a variant (an ablation) one of matplotlib's tab10 colours no line uses yet."""
    from matplotlib import colormaps
    from matplotlib import colors as mcolors

    taken = {mcolors.to_hex(ALGORITHMS[name].color) for name in names if name in ALGORITHMS}
    free = iter([mcolors.to_hex(color) for color in colormaps["tab10"].colors if mcolors.to_hex(color) not in taken])
    return {name: ALGORITHMS[name].color if name in ALGORITHMS else next(free, "#7f7f7f") for name in names}


def plot_score_curves(runs: dict[str, dict[int, list[dict]]], metric: str, models: Sequence[str], path: Path) -> Path:
    figure, axes = _pyplot().subplots(figsize=(8, 5), dpi=120)
    colors = line_colors(list(runs))
    for name, by_seed in runs.items():
        color = colors[name]
        for model in models:
            rounds, means, stds = band(list(by_seed.values()), metric, model)
            if len(rounds) < 2:
                continue
            axes.plot(
                rounds,
                means,
                LINE_STYLES[model],
                marker=MARKERS[model],
                markersize=4,
                color=color,
                label=f"{name} / {model}",
            )
            axes.fill_between(
                rounds,
                [m - s for m, s in zip(means, stds, strict=True)],
                [m + s for m, s in zip(means, stds, strict=True)],
                color=color,
                alpha=0.15,
                linewidth=0,
            )
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    axes.set_xlabel("round")
    axes.set_ylabel(LABELS.get(metric, metric))
    axes.set_title(f"{LABELS.get(metric, metric)} per round: mean over seeds {seeds}, band ±1 std")
    axes.grid(alpha=0.3)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return _save(figure, path)


def plot_final_bars(summary: dict, metric: str, models: Sequence[str], path: Path) -> Path:
    """The final round's `metric` per algorithm and model: bars at the mean, error bars ±1 std over the seeds."""
    figure, axis = _pyplot().subplots(figsize=(8, 4.5), dpi=120)
    names = list(summary["algorithms"])
    width = 0.8 / max(len(models), 1)
    for index, model in enumerate(models):
        stats = [summary["algorithms"][name].get(f"{metric}_{model}") for name in names]
        xs = [k + (index - (len(models) - 1) / 2) * width for k in range(len(names))]
        axis.bar(
            xs,
            [s["mean"] if s else float("nan") for s in stats],
            width=width,
            yerr=[s["std"] if s else float("nan") for s in stats],
            capsize=3,
            label=model,
            alpha=0.85,
        )
    untuned = summary.get("untuned", {})
    for model in models:
        if f"{metric}_{model}" in untuned:
            axis.axhline(untuned[f"{metric}_{model}"]["mean"], linestyle=":", color="grey", linewidth=1)
    axis.set_xticks(range(len(names)), names)
    axis.set_ylabel(LABELS.get(metric, metric))
    axis.set_title(f"final round, mean ± std over seeds {summary['seeds']} (dotted: untuned models)")
    axis.legend(fontsize=8)
    return _save(figure, path)
