"""The stage harness's check of the tracking server, its stage lock, and the offline runs' copy command."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from cifar10_pipeline.tracking import offline
from cifar10_pipeline.tracking.runs import StageLocked, stage_lock, unreachable_reason

from ..support.localserver import free_port


def test_a_closed_port_is_unreachable_at_once() -> None:
    started = time.monotonic()
    reason = unreachable_reason(f"http://127.0.0.1:{free_port()}")
    assert reason is not None and "refused" in reason.lower()
    assert time.monotonic() - started < 5  # one connection attempt, no retries


def test_a_listening_server_and_local_stores_are_reachable(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert unreachable_reason(f"http://127.0.0.1:{listener.getsockname()[1]}") is None
    assert unreachable_reason(f"sqlite:///{tmp_path / 'mlflow.db'}") is None
    assert unreachable_reason(str(tmp_path / "mlruns")) is None


def test_an_unknown_host_and_a_bad_port_say_why() -> None:
    assert unreachable_reason("http://no-such-host.invalid:5000") is not None
    assert "malformed" in (unreachable_reason("http://127.0.0.1:99999") or "")


def test_the_stage_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    lock = tmp_path / ".dvc" / "tmp" / "cifar10-stage.lock"
    lock.parent.parent.mkdir()
    with stage_lock("train", lock):
        assert "stage train (pid" in lock.read_text()
        with (
            pytest.raises(
                StageLocked, match=r"evaluate: stage train \(pid \d+\) is running in this checkout"
            ),
            stage_lock("evaluate", lock),
        ):
            pass
    with stage_lock("evaluate", lock):  # released on exit
        pass


def test_outside_a_dvc_project_there_is_nothing_to_lock(tmp_path: Path) -> None:
    lock = tmp_path / ".dvc" / "tmp" / "cifar10-stage.lock"
    with stage_lock("train", lock), stage_lock("evaluate", lock):
        pass
    assert not lock.parent.exists()


def test_the_copy_command_waits_for_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    assert offline.main(["--to", uri]) == 1
    assert f"{uri} does not answer" in capsys.readouterr().err


def test_the_copy_command_needs_a_local_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = f"sqlite:///{tmp_path / 'absent.db'}"
    assert offline.main(["--to", f"sqlite:///{tmp_path / 'server.db'}", "--from", source]) == 1
    assert "nothing was logged offline here" in capsys.readouterr().err
