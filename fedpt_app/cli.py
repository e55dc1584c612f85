"""`fedpt-app` commands beyond `flwr run`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path


def prepare(args: argparse.Namespace) -> None:
    """Build (or find) the embedded tiny preset and print its report."""
    from fedpt_app.models.loading import tiny_preset_dir

    folder = tiny_preset_dir(args.seed)
    report = json.loads((folder / "report.json").read_text())
    print(json.dumps({"folder": str(folder), **report}, indent=2))


def local_superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the detached local SuperLink that `flwr run` started for this FLWR_HOME, and its executors."""
    marker = str(flwr_home / "local-superlink")
    superlinks, executors = [], {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        command = " ".join(argv)
        if "flower-superlink" in command and marker in command:
            superlinks.append(int(proc.name))
        elif "flower-superexec" in command and "--parent-pid" in argv:
            executors[int(proc.name)] = int(argv[argv.index("--parent-pid") + 1])
    return superlinks + [pid for pid, parent in executors.items() if parent in superlinks]


def stop_local_superlink(args: argparse.Namespace) -> None:
    flwr_home = Path(args.flwr_home or os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    pids = local_superlink_pids(flwr_home)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    print(f"Stopped local SuperLink processes {pids}" if pids else "No local SuperLink running")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedpt-app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="pre-train the embedded tiny preset (first use only)")
    prepare_parser.add_argument("--seed", type=int, default=0)
    prepare_parser.set_defaults(handler=prepare)
    stop_parser = commands.add_parser("stop-local-superlink", help="stop the SuperLink that `flwr run` left running")
    stop_parser.add_argument("--flwr-home", default=None)
    stop_parser.set_defaults(handler=stop_local_superlink)
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
