"""Local deployment: the topology of `docker/compose.yaml` as plain processes on loopback.

One SuperLink with its ServerApp executor and N SuperNodes with their ClientApp executors (`flower-superexec`,
`--isolation process`, exactly the services of the compose file), insecure or with TLS and SuperNode
authentication (the default). The same `flwr run` a real
deployment uses, through a connection written into this deployment's own `FLWR_HOME/config.toml`. Every process
is started here and stopped by its PID (SIGTERM, then SIGKILL), also when something fails.

Used by `fedpt-app deploy-local`, tests/test_deployment.py and bench/deployment_vs_simulation.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from fedpt_app.models.loading import cache_root
from fedpt_app.tools.simulation import (
    PROJECT_DIR,
    SimulationOutcome,
    flower_env,
    process_alive,
    stream_flwr_run,
    validate_overrides,
)

CONNECTION = "fedpt-local"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None) -> None:
    """`flwr_home/config.toml` with one SuperLink connection, the default: TLS with this CA, or insecure (None)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
    )


class LocalDeployment:
    """SuperLink + N SuperNodes on 127.0.0.1; use as a context manager, then `run(...)`."""

    def __init__(
        self,
        work_dir: Path,
        num_supernodes: int = 2,
        secure: bool = True,
        app_dir: Path = PROJECT_DIR,
        model_cache: Path | None = None,
    ) -> None:
        self.work_dir, self.num_supernodes, self.secure, self.app_dir = work_dir, num_supernodes, secure, app_dir
        self.model_cache = model_cache or cache_root()
        self.credentials = work_dir / "credentials"
        self.logs = work_dir / "logs"
        self.env = flower_env(work_dir / "flwr-home")
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        self._log_files: list = []
        self.timings: dict[str, float] = {}

    # ---- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if self.secure:
            subprocess.run(
                [
                    "bash",
                    str(PROJECT_DIR / "scripts" / "make-certificates.sh"),
                    str(self.credentials),
                    str(self.num_supernodes),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
        self.timings["credentials_seconds"] = time.perf_counter() - started
        self._write_connection()
        started = time.perf_counter()
        self._spawn(
            "superlink",
            [
                "flower-superlink",
                *self._superlink_security(),
                "--isolation",
                "process",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.work_dir / "superlink.db"),
            ],
        )
        self._wait_for_port(self.port, "superlink")
        executor_security = ["--root-certificates", str(self.credentials / "ca.crt")] if self.secure else ["--insecure"]
        self._spawn(
            "serverapp", ["flower-superexec", *executor_security, "--runtime-api-address", f"127.0.0.1:{self.port}"]
        )
        self.timings["superlink_start_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        for index in range(1, self.num_supernodes + 1):
            if self.secure:
                self.register(self.credentials / f"supernode-{index}.pub")
            self.start_supernode(index)
        self.timings["supernodes_start_seconds"] = time.perf_counter() - started

    def stop(self) -> None:
        """SIGTERM the executors and SuperNodes first (so the nodes sign off), then the SuperLink; SIGKILL what is
        still running after 15 s."""
        others = [process for name, process in self.processes.items() if name != "superlink"]
        superlink = [self.processes["superlink"]] if "superlink" in self.processes else []
        for group in (others, superlink):
            for process in group:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            for process in group:
                try:
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for log in self._log_files:
            log.close()

    def alive(self) -> list[str]:
        return [name for name, process in self.processes.items() if process_alive(process.pid)]

    # ---- processes --------------------------------------------------------------------------------------
    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        self._log_files.append(log)
        process = subprocess.Popen(
            command, env=env or self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.work_dir
        )
        self.processes[name] = process
        return process

    def _superlink_security(self) -> list[str]:
        if not self.secure:
            return ["--insecure"]
        return [
            "--ssl-ca-certfile",
            str(self.credentials / "ca.crt"),
            "--ssl-certfile",
            str(self.credentials / "superlink.crt"),
            "--ssl-keyfile",
            str(self.credentials / "superlink.key"),
            "--enable-supernode-auth",
        ]

    def start_supernode(self, index: int, private_key: Path | None = None, name: str | None = None) -> subprocess.Popen:
        """SuperNode `index` (1-based) holding partition index-1; `private_key` overrides its registered key."""
        node_config = f'partition-id={index - 1} num-partitions={self.num_supernodes} model-cache="{self.model_cache}"'
        security = ["--insecure"]
        if self.secure:
            security = [
                "--root-certificates",
                str(self.credentials / "ca.crt"),
                "--auth-supernode-private-key",
                str(private_key or self.credentials / f"supernode-{index}"),
            ]
        name = name or f"supernode-{index}"
        runtime_port = free_port()
        supernode = self._spawn(
            name,
            [
                "flower-supernode",
                *security,
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--isolation",
                "process",
                "--port",
                str(runtime_port),
                "--node-config",
                node_config,
            ],
        )
        if private_key is None:  # a device expected to join gets its ClientApp executor
            self._wait_for_port(runtime_port, name)
            self._spawn(
                name.replace("supernode", "clientapp"),
                ["flower-superexec", "--insecure", "--runtime-api-address", f"127.0.0.1:{runtime_port}"],
                env=self._device_env(),
            )
        return supernode

    def _device_env(self) -> dict[str, str]:
        """Simulated devices share this machine's cores: give each its share of threads, as Ray does for
        simulated clients (oversubscribed OpenMP threads spin, and training got ~10x slower without this)."""
        threads = max(1, (os.cpu_count() or 1) // self.num_supernodes)
        return {**self.env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def register(self, public_key: Path) -> None:
        """Add a SuperNode's public key to the SuperLink's list of devices allowed to join."""
        subprocess.run(
            ["flwr", "supernode", "register", str(public_key), CONNECTION],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def _write_connection(self) -> None:
        root_certificates = (self.credentials / "ca.crt").resolve() if self.secure else None
        write_connection(Path(self.env["FLWR_HOME"]), CONNECTION, f"127.0.0.1:{self.port}", root_certificates)

    def _wait_for_port(self, port: int, name: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.processes[name].returncode}; see {self.logs / name}.log")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")

    # ---- runs -------------------------------------------------------------------------------------------
    def run(self, run_config: str = "", echo: TextIO | None = sys.stdout, verbose: bool = False) -> SimulationOutcome:
        """`flwr run APP fedpt-local --stream`, validated first; the outcome as the SuperLink reports it."""
        validate_overrides(run_config, self.app_dir)
        command = ["flwr", "run", str(self.app_dir), CONNECTION, "--stream"]
        if run_config.strip():
            command += ["--run-config", run_config]
        return stream_flwr_run(command, self.env, echo, verbose)
