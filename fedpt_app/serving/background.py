"""Servers for tests, benchmarks and notebooks: an app in a thread of this process, or a serving command in its own
process (loopback by default)."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from fastapi import FastAPI

from fedpt_app.serving.remote import RemoteModelError

WEBSOCKETS = "websockets-sansio"  # uvicorn's WebSocket server on websockets' current API (its "websockets" is legacy)


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` while the block runs (port 0: a free one); yields its base URL ("http://host:port")."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", ws=WEBSOCKETS)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fedpt-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("The server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def service_process(
    command: list[str], url: str, *, ready_path: str, env=None, timeout_s: float = 600
) -> Iterator[str]:
    """Run a serving command (`fedpt-app serve-logits …`, `fedpt-app serve …`) in its own process while the block
    runs, as its operator would; yields `url` once `ready_path` answers."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_until_ready(url, timeout_s=timeout_s, process=process, path=ready_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:  # open keep-alive connections can hold a graceful shutdown
            process.kill()
            process.wait(30)


def wait_until_ready(url: str, timeout_s: float = 120.0, process=None, path: str = "/healthz") -> None:
    """Block until a service answers `path` with 200 (a freshly started one loads its model first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RemoteModelError(f"the service at {url} exited with status {process.returncode} while starting")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return
        time.sleep(0.25)
    raise RemoteModelError(f"no answer from {url}{path} within {timeout_s:g} s")
