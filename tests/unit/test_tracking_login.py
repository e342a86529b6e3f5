"""The stage harness's login check (tracking.runs.login_refused) against a small real HTTP server on loopback
that answers like MLflow's basic-auth app: 401 unless the request carries the one valid login. The full
stack (the real auth app, a real stage) is tests/integration/test_team_auth.py."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cifar10_pipeline.core.errors import PipelineError
from cifar10_pipeline.tracking.runs import login_refused

VALID = "Basic " + base64.b64encode(b"alice:s3cret").decode()


class AuthHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.headers.get("Authorization") == VALID
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b'{"experiments": []}' if ok else b"You are not authenticated.")

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), AuthHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


@pytest.mark.parametrize(
    ("login", "names"),
    [
        ({}, "MLFLOW_TRACKING_USERNAME is not set"),
        ({"MLFLOW_TRACKING_USERNAME": "alice"}, "MLFLOW_TRACKING_PASSWORD is not set"),
        (
            {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "x"},
            "with this MLFLOW_TRACKING_PASSWORD",
        ),
    ],
)
def test_a_missing_or_wrong_login_is_one_line_naming_the_variable(
    server: str, monkeypatch: pytest.MonkeyPatch, login: dict[str, str], names: str
) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in login.items():
        monkeypatch.setenv(name, value)
    refused = login_refused("train", server)
    assert isinstance(refused, PipelineError)
    assert names in str(refused) and "\n" not in str(refused) and server in str(refused)
    assert refused.hint and "MLFLOW_TRACKING_USERNAME" in refused.hint


def test_a_valid_login_a_server_without_auth_and_local_stores_pass(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    assert login_refused("train", server) is None
    assert login_refused("train", "sqlite:///mlflow.db") is None
    assert login_refused("train", "/tmp/mlruns") is None
