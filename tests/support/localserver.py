"""Run an HTTP server in a child process on a free loopback port, for the load benchmark and the tests.

The server is ready when its health URL answers 200; it is always stopped on exit (terminate, then kill).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx


class ServerURL(str):
    """The base URL of a server started by ``local_server``; ``pid`` is its process (e.g. to read its RSS)."""

    pid: int


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_server(
    command: Sequence[str],
    port: int,
    log_path: Path,
    env: dict[str, str] | None = None,
    health_path: str = "/health",
    timeout: float = 120.0,
    cwd: Path | None = None,
) -> Iterator[ServerURL]:
    """Start ``command`` (which must listen on 127.0.0.1:``port``); yield its base URL once healthy (a
    ``ServerURL``: a str that also carries the process id). The server leads its own process group, so a
    test can kill it with its workers (``os.killpg(url.pid, ...)``)."""
    log_path = Path(log_path)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(command),
            env={**os.environ, **(env or {})},
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = ServerURL(f"http://127.0.0.1:{port}")
    url.pid = process.pid
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}{health_path}", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server did not become healthy in {timeout:.0f} s:\n{log_path.read_text()}"
                )
            time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # workers that outlived their parent


def mlflow_server(store_uri: str, cwd: Path, log_path: Path) -> contextlib.AbstractContextManager[ServerURL]:
    """``mlflow server`` (this venv's) on ``store_uri`` and a free local port; yields its URL once /health
    answers."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        store_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",  # 2 cores: one worker serves a test's few requests
    ]
    # MLflow 3's job runner (GenAI scorers, trace roll-ups: 8 more processes) serves nothing the tests log;
    # off, as the team server has it (tracking.team_server's mlflow_jobs).
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return local_server(command, port, log_path, env=env, cwd=cwd)


def model_server(
    model: str | Path,
    log_path: Path,
    timeout: float = 120.0,
    flags: Sequence[str] = (),
    **settings: object,
) -> contextlib.AbstractContextManager[ServerURL]:
    """``python -m cifar10_pipeline.serving.serve`` for ``model``; extra CIFAR10_SERVE_* settings as
    keywords, command-line ``flags`` after the module."""
    port = free_port()
    env = {
        "CIFAR10_SERVE_MODEL": str(model),
        "CIFAR10_SERVE_HOST": "127.0.0.1",
        "CIFAR10_SERVE_PORT": str(port),
        **{f"CIFAR10_SERVE_{key.upper()}": str(value) for key, value in settings.items()},
    }
    return local_server(
        [sys.executable, "-m", "cifar10_pipeline.serving.serve", *flags], port, log_path, env, timeout=timeout
    )
