"""The FedPFT ablation table of docs/results.md from a finished `fedpt-app compare` of the four variants.

    python scripts/ablation_table.py ~/fedpt-app-runs/ablation

Per variant over its seeds (mean ± sample std): the final round's accuracy of the full FM and of the sub-FM, the mean
over the last three evaluated rounds (a fixed rule, steadier than one round when each round draws a few skewed
clients), and that mean minus FedPFT's in the same seed (same partitions and clients: a paired difference).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedpt_app.tools.compare import read_metrics
from fedpt_app.tools.compare import spread as mean_std

VARIANTS = {
    "fedpft": "FedPFT (both alignments)",
    "fedpft-align-before-false": "without layer-level (before FL)",
    "fedpft-align-during-false": "without neuron-level (during FL)",
    "fedpft-align-before-false-align-during-false": "without either",
}


def spread(values: list[float]) -> str:
    stats = mean_std(values)
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def seed_scores(run: Path) -> dict[str, float]:
    rows = read_metrics(run)
    last = rows[-3:]
    return {
        "final_full": rows[-1]["accuracy_full"],
        "final_sub": rows[-1]["accuracy_sub"],
        "last3_full": statistics.fmean(row["accuracy_full"] for row in last),
        "last3_sub": statistics.fmean(row["accuracy_sub"] for row in last),
        "seconds": json.loads((run / "summary.json").read_text())["total_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="the compare's --output folder")
    output = parser.parse_args().output.expanduser()
    scores = {
        folder: {run.name: seed_scores(run) for run in sorted((output / folder).glob("seed*"))}
        for folder in VARIANTS
        if (output / folder).is_dir()
    }
    baseline = scores.get("fedpft", {})
    print(
        "| variant | seeds | full FM, final round | sub-FM, final round | full FM, mean of the last 3 rounds "
        "| sub-FM, mean of the last 3 rounds | full FM, last 3 minus FedPFT's (same seed) | run seconds |"
    )
    print("|---" * 8 + "|")
    for folder, by_seed in scores.items():
        column = {key: [seed[key] for seed in by_seed.values()] for key in next(iter(by_seed.values()))}
        paired = [
            seed["last3_full"] - baseline[name]["last3_full"] for name, seed in by_seed.items() if name in baseline
        ]
        cells = [spread(column[key]) for key in ("final_full", "final_sub", "last3_full", "last3_sub")]
        difference = spread(paired) if folder != "fedpft" and paired else "-"
        seconds = f"{statistics.fmean(column['seconds']):.0f}"
        print(f"| {VARIANTS[folder]} | {len(by_seed)} | " + " | ".join([*cells, difference, seconds]) + " |")


if __name__ == "__main__":
    main()
