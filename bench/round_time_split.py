"""Where a round's time goes in the default run: framework overhead vs local training vs evaluation.

Runs the default simulation (`fedpt-app simulate`, i.e. `flwr run . --stream`) and prints, per round, the
measured split and how many times each process loaded a base model (target: once).

    python bench/round_time_split.py [--run-config "..."] [--num-supernodes 4]

framework = round time - slowest client's local training - server step - central evaluation (message passing,
serialization, Ray scheduling and, in round 1, the ClientApp processes' imports and model loads).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fedpt_app.federation.metrics_log import framework_seconds
from fedpt_app.tools.simulation import run_simulation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--num-supernodes", type=int, default=4)
    args = parser.parse_args()
    output = Path(tempfile.mkdtemp(prefix="fedpt-bench-"))
    outcome = run_simulation(f"{args.run_config} output-dir='{output}'", num_supernodes=args.num_supernodes, echo=None)
    if not outcome.succeeded:
        print(outcome.log[-4000:], file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    header = (
        f"{'round':>5} {'total s':>8} {'framework s':>11} {'train s':>8} {'server s':>8} {'eval s':>7} "
        f"{'framework %':>11} {'client loads':>12} {'server loads':>12}"
    )
    print(header)
    totals = {"round": 0.0, "framework": 0.0, "train": 0.0, "server": 0.0, "eval": 0.0}
    for row in rows:
        train, server = row.get("client_train_seconds", 0.0), row.get("server_step_seconds", 0.0)
        framework = max(0.0, framework_seconds(row))
        for key, value in (
            ("round", row["round_seconds"]),
            ("framework", framework),
            ("train", train),
            ("server", server),
            ("eval", row["eval_seconds"]),
        ):
            totals[key] += value
        print(
            f"{row['round']:>5} {row['round_seconds']:>8.2f} {framework:>11.2f} {train:>8.2f} {server:>8.2f} "
            f"{row['eval_seconds']:>7.2f} {100 * framework / row['round_seconds']:>10.1f}% "
            f"{row.get('client_model_loads', '-'):>12} {row['server_model_loads']:>12}"
        )
    print(
        f"{'all':>5} {totals['round']:>8.2f} {totals['framework']:>11.2f} {totals['train']:>8.2f} "
        f"{totals['server']:>8.2f} {totals['eval']:>7.2f} {100 * totals['framework'] / totals['round']:>10.1f}%"
    )
    later = [r for r in rows if r["round"] >= 2]
    if later:
        overhead = sum(framework_seconds(r) for r in later) / len(later)
        print(
            f"rounds >= 2: framework overhead {overhead:.2f} s per round "
            f"({overhead / (sum(r['round_seconds'] for r in later) / len(later)):.2f} of the round)"
        )
    print(f"outputs: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
