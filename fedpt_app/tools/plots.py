"""Plots of a comparison with matplotlib: a score against rounds, the mean over seeds with a ±1 std band."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from fedpt_app.algorithms import ALGORITHMS

LABELS = {"rouge_l": "Rouge-L F1 (%)", "exact_match": "exact match (%)", "accuracy": "accuracy (%)"}
LINE_STYLES = {"small": "-", "proxy": "-", "large": "--", "full": "-", "sub": "--"}
MARKERS = {"small": "o", "proxy": "s", "large": "^", "full": "o", "sub": "^"}


def series(rows: Sequence[dict], metric: str, model: str) -> dict[int, float]:
    """round -> score of one model in one run; the proxy's round 0 is the untuned large model it starts from."""
    key = f"{metric}_{model}"
    points = {row["round"]: row[key] for row in rows if row.get(key) is not None}
    untuned_large = rows[0].get(f"{metric}_large") if rows and rows[0]["round"] == 0 else None
    if model == "proxy" and points and untuned_large is not None:
        points[0] = untuned_large
    return points


def band(runs: Sequence[Sequence[dict]], metric: str, model: str) -> tuple[list[int], list[float], list[float]]:
    """(rounds every seed evaluated, mean, std) of one model over the seeds."""
    per_seed = [series(rows, metric, model) for rows in runs]
    rounds = sorted(set.intersection(*(set(points) for points in per_seed))) if per_seed else []
    means = [statistics.fmean(points[r] for points in per_seed) for r in rounds]
    stds = [statistics.stdev(points[r] for points in per_seed) if len(per_seed) > 1 else 0.0 for r in rounds]
    return rounds, means, stds


def plot_score_curves(runs: dict[str, dict[int, list[dict]]], metric: str, models: Sequence[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    for name, by_seed in runs.items():
        color = ALGORITHMS[name].color
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
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
