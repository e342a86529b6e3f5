"""``cifar10 pull`` on real DVC projects (``dvc init``, a real ``dvc push`` to a folder remote): an absent
remote is said in one line with a hint and nothing is fetched; a present one is pulled by DVC itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cifar10_pipeline.serving import cli
from tests.support.localserver import free_port


def _dvc(project: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, check=True, capture_output=True)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DVC project (no git) with one tracked file whose default remote is a folder beside it (absent)."""
    root = tmp_path_factory.mktemp("template") / "clone"
    root.mkdir()
    _dvc(root, "init", "--no-scm")
    (root / "model.bin").write_bytes(b"weights" * 100)
    _dvc(root, "add", "model.bin")
    _dvc(root, "remote", "add", "--default", "local", "../remote")
    _dvc(root, "remote", "add", "team", "s3://cifar10-dvc")
    return root


@pytest.fixture
def project(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "clone", symlinks=True))


def _pull(project: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    status = cli.main(["pull", "--project", str(project), *args])
    return status, capsys.readouterr().err.splitlines()


def test_absent_folder_remote_is_one_line_and_nothing_is_fetched(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "model.bin").unlink()
    status, lines = _pull(project, capsys)
    assert status == cli.EXIT_USAGE
    assert lines[0] == (
        f"cifar10 pull: error: the DVC remote 'local' is the folder {project.parent / 'remote'}, "
        "which does not exist on this machine"
    )
    assert lines[1].startswith("cifar10 pull: hint: ") and "profile=quick" in lines[1]
    assert len(lines) == 2
    assert not (project / "model.bin").exists()


def test_present_remote_is_pulled_by_dvc(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _dvc(project, "push")
    (project / "model.bin").unlink()
    shutil.rmtree(project / ".dvc" / "cache")
    status, lines = _pull(project, capsys)
    assert status == 0, lines
    assert (project / "model.bin").read_bytes() == b"weights" * 100


def test_s3_remote_without_endpoint_or_unreachable(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, lines = _pull(project, capsys, "-r", "team")
    assert status == cli.EXIT_USAGE
    assert lines[0].endswith("has no S3 endpoint or keys on this machine") and "dvc-remote" in lines[1]

    closed = f"http://127.0.0.1:{free_port()}"
    _dvc(project, "remote", "modify", "--local", "team", "endpointurl", closed)
    status, lines = _pull(project, capsys, "-r", "team")
    assert status == cli.EXIT_USAGE
    assert f"S3 endpoint at {closed}, which does not answer" in lines[0] and "team_server start" in lines[1]


def test_unknown_remote_names_the_configured_ones(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, lines = _pull(project, capsys, "-r", "nope")
    assert status == cli.EXIT_USAGE
    assert lines == [
        "cifar10 pull: error: no DVC remote named 'nope'",
        "cifar10 pull: hint: configured: local, team (dvc remote list)",
    ]
