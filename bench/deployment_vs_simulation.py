"""A 2-round run of the default preset: local deployment (SuperLink + SuperNodes, TLS + auth) vs simulation.

    python bench/deployment_vs_simulation.py [--run-config "..."] [--insecure]

Prints the wall time of each, where the difference goes (credentials, SuperLink and SuperNode start, per-round
framework time), and what one ClientApp task pays in a fresh process in deployment (each task is a new
`flwr-clientapp` process there): importing `client_app`, then the family's device task (torch, transformers, peft)
when the first message arrives, and loading the small model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedpt_app.federation.metrics_log import framework_seconds
from fedpt_app.models.loading import tiny_preset_dir
from fedpt_app.tools.deployment import LocalDeployment
from fedpt_app.tools.simulation import PROJECT_DIR, run_simulation

RUN = "num-server-rounds=2 fraction-train=1.0"


def _rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _framework(rows: list[dict]) -> list[float]:
    return [framework_seconds(row) for row in rows if row["round"] > 0]


def _fresh_process_seconds(code: str, repeats: int = 3) -> float:
    """Median wall time of `python -c code` in a fresh process, minus an empty interpreter's start."""

    def timed(snippet: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", snippet], check=True, cwd=PROJECT_DIR, capture_output=True)
        return time.perf_counter() - started

    baseline = statistics.median(timed("pass") for _ in range(repeats))
    return statistics.median(timed(code) for _ in range(repeats)) - baseline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--insecure", action="store_true")
    args = parser.parse_args()
    tiny_preset_dir()
    work = Path(tempfile.mkdtemp(prefix="fedpt-bench-deploy-"))
    run_config = f"{RUN} {args.run_config}"

    started = time.perf_counter()
    simulated = run_simulation(
        f"{run_config} output-dir='{work / 'simulation'}'", num_supernodes=2, flwr_home=work / "flwr-sim", echo=None
    )
    simulation_seconds = time.perf_counter() - started

    started = time.perf_counter()
    with LocalDeployment(work / "deployment", 2, secure=not args.insecure) as deployment:
        up_seconds = time.perf_counter() - started
        run_started = time.perf_counter()
        deployed = deployment.run(f"{run_config} output-dir='{work / 'deployment' / 'out'}'", echo=None)
        run_seconds = time.perf_counter() - run_started
    deployment_seconds = time.perf_counter() - started
    if not (simulated.succeeded and deployed.succeeded):
        print(simulated.log[-2000:], deployed.log[-2000:], file=sys.stderr)
        return 1

    sim_rows, dep_rows = _rows(work / "simulation"), _rows(work / "deployment" / "out")
    app_import = _fresh_process_seconds("import client_app")
    task_import = _fresh_process_seconds("import client_app, fedpt_app.instruct.device_task")
    model_load = (
        _fresh_process_seconds(
            "import client_app, fedpt_app.instruct.device_task\n"
            "from fedpt_app.models.loading import load_causal_lm\n"
            "load_causal_lm('tiny-small')"
        )
        - task_import
    )
    mode = "insecure" if args.insecure else "TLS + SuperNode auth"
    print(f"2-round run, default preset (FedPT), 2 clients; deployment: {mode}")
    print(f"{'':44} {'simulation':>11} {'deployment':>11}")
    print(f"{'whole run, wall s':44} {simulation_seconds:>11.1f} {deployment_seconds:>11.1f}")
    for name, value in deployment.timings.items():
        print(f"{'  ' + name.replace('_', ' '):44} {'-':>11} {value:>11.1f}")
    print(f"{'  flwr run (submit to end), s':44} {'-':>11} {run_seconds:>11.1f}")
    for label, key in (("round 1 s", 0), ("round 2 s", 1)):
        print(f"{label:44} {sim_rows[key + 1]['round_seconds']:>11.1f} {dep_rows[key + 1]['round_seconds']:>11.1f}")
        print(
            f"{'  of which framework (spawn, imports, load)':44} {_framework(sim_rows)[key]:>11.1f} "
            f"{_framework(dep_rows)[key]:>11.1f}"
        )
        print(
            f"{'  of which local training (slowest client)':44} {sim_rows[key + 1]['client_train_seconds']:>11.1f} "
            f"{dep_rows[key + 1]['client_train_seconds']:>11.1f}"
        )
    print(
        f"ClientApp task in a fresh process: `import client_app` {app_import:.2f} s, with the device task's imports "
        f"{task_import:.2f} s, small-model load {model_load:.2f} s (paid every round in deployment, once per "
        "process in simulation)"
    )
    print(f"SuperLink up and SuperNodes started in {up_seconds:.1f} s; outputs under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
