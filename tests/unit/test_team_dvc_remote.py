"""`team_server dvc-remote` writes the endpoint and the keys into a real DVC project's .dvc/config.local:
through DVC's config API, so a generated key that starts with "-" (secrets.token_urlsafe makes such keys; CI
met one) is not read as a command-line option, and no key is ever on a command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cifar10_pipeline.tracking.team_server import Config, TeamServer, TeamServerError


def dvc_project(root: Path, remote: str | None = "team") -> Path:
    root.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    if remote:
        subprocess.run(
            [sys.executable, "-m", "dvc", "remote", "add", remote, "s3://cifar10-dvc"], cwd=root, check=True
        )
    return root


def server_with_keys(home: Path, identity: str, access: str, secret: str) -> TeamServer:
    server = TeamServer(home)
    server.secrets.mkdir(parents=True, mode=0o700)
    (server.secrets / f"s3_{identity}_access_key").write_text(access)
    (server.secrets / f"s3_{identity}_secret_key").write_text(secret)
    return server


def test_a_key_starting_with_a_dash_reaches_config_local(tmp_path: Path) -> None:
    project = dvc_project(tmp_path / "project")
    secret = "-OU3-ht0efZj32eWJhg40E7aQuGJJcVWWkbBbY30"
    server = server_with_keys(tmp_path / "home", "dvc_write", "dvcwrite0123", secret)
    config = Config()
    server.configure_dvc_remote(config, project, "team", "write")

    local = (project / ".dvc/config.local").read_text()
    assert secret in local and "dvcwrite0123" in local and config.s3_endpoint in local
    assert secret not in (project / ".dvc/config").read_text()
    # DVC itself reads it back: the merged remote and the default
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "config", "--local", "--list"],
        cwd=project, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f"remote.team.secret_access_key={secret}" in shown and "core.remote=team" in shown


def test_a_project_without_the_remote_is_one_clear_error_and_nothing_written(tmp_path: Path) -> None:
    project = dvc_project(tmp_path / "project", remote=None)
    server = server_with_keys(tmp_path / "home", "dvc_read", "dvcread0123", "s3cret")
    with pytest.raises(TeamServerError, match=r"defines remote 'team'"):
        server.configure_dvc_remote(Config(), project, "team", "read")
    assert not (project / ".dvc/config.local").exists()
