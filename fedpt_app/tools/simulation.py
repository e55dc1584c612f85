"""Run `flwr run . --stream` on the local simulation engine and report how the run really ended.

`flwr run --stream` exits 0 even when the ServerApp raised, and rejects a misspelled config key without naming
it; this wrapper validates the overrides first (listing the valid keys), streams the log, asks the SuperLink for
the run's final status, and stops the detached local SuperLink by its PIDs afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import click
import tomllib
from flwr.common.config import parse_config_args

from fedpt_app.config import ConfigError, RunConfig

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the app: pyproject.toml, server_app.py, client_app.py
_RUN_ID = re.compile(r"Successfully started run (\d+)")


@dataclass(frozen=True)
class SimulationOutcome:
    run_id: str | None
    status: str  # e.g. "finished:completed", "finished:failed"
    details: str
    log: str

    @property
    def succeeded(self) -> bool:
        return self.status == "finished:completed"


def default_run_config(app_dir: Path = PROJECT_DIR) -> dict:
    with (app_dir / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def validate_overrides(run_config: str, app_dir: Path = PROJECT_DIR) -> RunConfig:
    """The config `flwr run` would build from these overrides, validated (raises ConfigError)."""
    try:
        overrides = parse_config_args([run_config]) if run_config.strip() else {}
    except (click.ClickException, ValueError) as error:  # Flower's TOML errors, e.g. a key given twice
        message = error.format_message() if isinstance(error, click.ClickException) else str(error)
        raise ConfigError(f"--run-config {run_config!r}: {message}") from None
    return RunConfig.from_mapping({**default_run_config(app_dir), **overrides})


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_HOME", str(PROJECT_DIR / ".flwr"))
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # else each run `uv sync`s (a CUDA torch)
    return env


LOCAL_SUPERLINK = ("127.0.0.1", 39091)  # where `flwr run` starts its local SuperLink (not configurable)


def local_superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the detached local SuperLink that `flwr run` started for this FLWR_HOME, its executors, and the
    processes those run (the ServerApp / simulation runtime)."""
    marker = str(flwr_home / "local-superlink")
    superlinks, executors, parents = [], {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        command = " ".join(argv)
        if "flower-superlink" in command and marker in command:
            superlinks.append(int(proc.name))
        elif "flower-superexec" in command and "--parent-pid" in argv:
            executors[int(proc.name)] = int(argv[argv.index("--parent-pid") + 1])
    ours = [pid for pid, parent in executors.items() if parent in superlinks]
    runtimes = [pid for pid, parent in parents.items() if parent in ours]
    return superlinks + ours + runtimes


def stop_local_superlink(flwr_home: Path, timeout: float = 15.0) -> list[int]:
    """Stop the local SuperLink of this FLWR_HOME and wait until its processes are gone (SIGKILL after timeout)."""
    pids = local_superlink_pids(flwr_home)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_all([pid for pid in pids if process_alive(pid)], signal.SIGKILL)
    return pids


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def process_alive(pid: int) -> bool:
    try:  # a zombie still has /proc/<pid> but no longer holds sockets
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class LocalSuperLinkBusy(RuntimeError):
    """Another FLWR_HOME's local SuperLink holds Flower's fixed local port: runs would mix."""


def check_local_superlink_free(flwr_home: Path) -> None:
    """Flower's local SuperLink always listens on 127.0.0.1:39091; one started for another FLWR_HOME (another
    simulation on this machine) would silently receive our run. Refuse clearly instead."""
    deadline = time.monotonic() + 20.0  # a SuperLink whose run just ended may still be closing
    while _port_open(LOCAL_SUPERLINK) and not local_superlink_pids(flwr_home):
        if time.monotonic() > deadline:
            raise LocalSuperLinkBusy(
                f"Another local Flower SuperLink is listening on {LOCAL_SUPERLINK[0]}:"
                f"{LOCAL_SUPERLINK[1]} (another simulation on this machine, with another "
                "FLWR_HOME): wait for it to finish, or stop it (`fedpt-app "
                "stop-local-superlink --flwr-home DIR`)"
            )
        time.sleep(0.5)


def _port_open(address: tuple[str, int]) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(address) == 0


def _run_status(run_id: str, env: dict[str, str]) -> tuple[str, str]:
    listed = subprocess.run(
        ["flwr", "ls", "--run-id", run_id, "--format", "json"], env=env, capture_output=True, text=True, timeout=60
    )
    try:
        run = json.loads(listed.stdout)["runs"][0]
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown", listed.stdout + listed.stderr
    return run["status"], run.get("status-details", "")


def run_simulation(
    run_config: str = "",
    *,
    num_supernodes: int = 4,
    client_cpus: float = 1,
    client_gpus: float = 0,
    app_dir: Path = PROJECT_DIR,
    flwr_home: Path | None = None,
    echo: TextIO | None = sys.stdout,
    verbose: bool = False,
) -> SimulationOutcome:
    validate_overrides(run_config, app_dir)
    env = flower_env(flwr_home)
    home = Path(env["FLWR_HOME"])
    check_local_superlink_free(home)
    command = [
        "flwr",
        "run",
        str(app_dir),
        "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus} "
        f"client-resources-num-gpus={client_gpus}",
    ]
    if run_config.strip():
        command += ["--run-config", run_config]
    try:
        return stream_flwr_run(command, env, echo, verbose)
    finally:
        stop_local_superlink(home)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL = re.compile(r"^(INFO|WARNING|DEBUG)\s*:\s*")


def quiet_line(line: str) -> str | None:
    """The line as the quiet terminal shows it: the server's own `[fedpt-app]` lines (level prefix and colours
    dropped) and errors; None for the rest (Flower's round banners and metric dumps, Ray's and the libraries'
    warnings, the devices' lines)."""
    text = _ANSI.sub("", line)
    if "ERROR" in text:
        return text
    if "[fedpt-app]" not in text or "ClientAppActor" in text:
        return None
    return _LEVEL.sub("", text)


def stream_flwr_run(
    command: list[str], env: dict[str, str], echo: TextIO | None, verbose: bool = False
) -> SimulationOutcome:
    """Run a `flwr run ... --stream` command, echo its log (all of it when `verbose`, else `quiet_line`s), and ask
    the SuperLink how the run really ended. The outcome keeps the whole log."""
    lines: list[str] = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            shown = line if verbose else quiet_line(line)
            if echo is not None and shown is not None:
                echo.write(shown)
                echo.flush()
    log = "".join(lines)
    match = _RUN_ID.search(log)
    if match is None:
        return SimulationOutcome(None, "not-started", f"flwr run exited with {proc.returncode}", log)
    status, details = _run_status(match.group(1), env)
    return SimulationOutcome(match.group(1), status, details, log)
