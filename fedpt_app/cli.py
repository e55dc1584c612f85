"""`fedpt-app` commands beyond `flwr run`: prepare the offline preset, run a checked simulation, check a config."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fedpt_app.config import ConfigError


def prepare(args: argparse.Namespace) -> int:
    """Build (or find) the embedded tiny preset and print its report."""
    from fedpt_app.models.loading import tiny_preset_dir

    folder = tiny_preset_dir(args.seed)
    report = json.loads((folder / "report.json").read_text())
    print(json.dumps({"folder": str(folder), **report}, indent=2))
    return 0


def simulate(args: argparse.Namespace) -> int:
    """`flwr run . --stream` on simulated clients; exit status 0 only if the run completed."""
    from fedpt_app.simulation import run_simulation

    outcome = run_simulation(args.run_config, num_supernodes=args.num_supernodes, client_cpus=args.client_cpus)
    if outcome.succeeded:
        return 0
    print(f"\n[fedpt-app] run {outcome.run_id} ended as {outcome.status}: {outcome.details}", file=sys.stderr)
    return 1


def check_config(args: argparse.Namespace) -> int:
    """Validate --run-config overrides against the app's config without starting anything."""
    from fedpt_app.simulation import validate_overrides

    config = validate_overrides(args.run_config)
    print(json.dumps({key: getattr(config, key.replace("-", "_")) for key in config.keys()}, indent=2))
    return 0


def stop_local_superlink(args: argparse.Namespace) -> int:
    from fedpt_app.simulation import stop_local_superlink as stop

    pids = stop(Path(args.flwr_home or os.environ.get("FLWR_HOME", Path.home() / ".flwr")))
    print(f"Stopped local SuperLink processes {pids}" if pids else "No local SuperLink running")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpt-app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("prepare", help="pre-train the embedded tiny preset (first use only)")
    command.add_argument("--seed", type=int, default=0)
    command.set_defaults(handler=prepare)
    command = commands.add_parser("simulate", help="flwr run . --stream on simulated clients, with a real exit status")
    command.add_argument("--run-config", default="", help='overrides, e.g. "num-server-rounds=3 lr=0.001"')
    command.add_argument("--num-supernodes", type=int, default=4)
    command.add_argument("--client-cpus", type=float, default=1)
    command.set_defaults(handler=simulate)
    command = commands.add_parser("check-config", help="validate --run-config overrides and print the full config")
    command.add_argument("--run-config", default="")
    command.set_defaults(handler=check_config)
    command = commands.add_parser("stop-local-superlink", help="stop the SuperLink that `flwr run` left running")
    command.add_argument("--flwr-home", default=None)
    command.set_defaults(handler=stop_local_superlink)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"fedpt-app: configuration error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
