"""Team stacks for the backup and concurrency tests: started with ``team_server start`` on free loopback ports
in a temporary home (as tests/integration/test_team_server.py's fixture does, its editor login made by
``users add``), and a snapshot of everything a
stack holds, read back through the MLflow client and S3, for comparing two stacks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.localserver import free_port

from .test_team_server import EDITOR, PORT_NAMES, Team


def require_postgres() -> None:
    if shutil.which("initdb") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.fail("PostgreSQL's server binaries are missing: apt-get install postgresql (see .ci/run)")


@contextlib.contextmanager
def team_stack(prefix: str = "team-server-") -> Iterator[Team]:
    """A started stack, stopped and deleted afterwards. Its home is under /tmp, not pytest's tmp_path: as
    root, PostgreSQL runs as another user, which must reach its data folder."""
    require_postgres()
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    ports = [arg for name in PORT_NAMES for arg in ("--port", f"{name}={free_port()}")]
    team = Team(home, "", "", {})
    started = time.monotonic()
    try:
        team.cli("start", *ports, timeout=400)
        print(f"team server in {home} started in {time.monotonic() - started:.0f} s")
        team.config = json.loads((home / "config.json").read_text())
        team.tracking_uri = f"http://127.0.0.1:{team.config['ports']['mlflow']}"
        team.s3_endpoint = f"http://127.0.0.1:{team.config['ports']['s3']}"
        team.cli("users", "add", EDITOR, "--role", "editor")
        yield team
    finally:
        failure = ""
        try:
            discard_seaweedfs(home)
            team.cli("stop", timeout=120)
        except AssertionError as error:
            failure = str(error)
        shutil.rmtree(home, ignore_errors=True)
        assert not failure, failure


@contextlib.contextmanager
def logged_in(team: Team, user: str = EDITOR) -> Iterator[None]:
    """In-process MLflow clients log in to ``team`` as ``user``, the MLflow way (MLFLOW_TRACKING_USERNAME
    and _PASSWORD, read at each request); the environment as it was afterwards. One stack at a time: two
    stacks have two logins."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in team.login(user).items():
            patch.setenv(name, value)
        yield


def discard_seaweedfs(home: Path) -> None:
    """SIGKILL the SeaweedFS server of a stack about to be deleted: its graceful stop takes about 15 s,
    for state nobody will read again (``stop`` then finds it gone and stops the rest)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((home / "seaweedfs.pid").read_text().split()[0])
        if Path(os.readlink(f"/proc/{pid}/cwd")) == home.resolve():  # ours, not a recycled pid
            os.killpg(pid, signal.SIGKILL)


def bucket_objects(team: Team, bucket: str) -> dict[str, str]:
    """key -> sha256 of every object in ``bucket``, read straight from the S3 gateway."""
    s3 = team.s3()
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            found[item["Key"]] = hashlib.sha256(body).hexdigest()
    return found


def _artifacts(client: Any, run_id: str, scratch: Path, path: str | None = None) -> dict[str, str]:
    """artifact path -> sha256 of its bytes, downloaded through the MLflow server (proxied artifacts)."""
    out = {}
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            out.update(_artifacts(client, run_id, scratch, item.path))
        else:
            local = Path(client.download_artifacts(run_id, item.path, str(scratch)))
            out[item.path] = hashlib.sha256(local.read_bytes()).hexdigest()
    return out


def snapshot(team: Team, scratch: Path, user: str = "admin") -> dict[str, Any]:
    """Everything a stack holds, as ``user`` sees it (the admin by default: it sees everything):
    experiments, runs (params, tags, every metric's full history, the sha256 of every artifact), registered
    models (versions, tags, aliases) and both buckets."""
    with logged_in(team, user):
        return _snapshot(team, scratch)


def _snapshot(team: Team, scratch: Path) -> dict[str, Any]:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=team.tracking_uri, registry_uri=team.tracking_uri)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    runs = {}
    for run in client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL):
        run_id = run.info.run_id
        runs[run_id] = {
            "name": run.info.run_name,
            "experiment": run.info.experiment_id,
            "status": run.info.status,
            "times": (run.info.start_time, run.info.end_time),
            "params": run.data.params,
            "tags": run.data.tags,
            "metrics": {
                key: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]
                for key in run.data.metrics
            },
            "artifacts": _artifacts(client, run_id, scratch / run_id),
        }
    models = {}
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{model.name}'")
        models[model.name] = {
            "aliases": dict(model.aliases),
            "tags": model.tags,
            "versions": {
                v.version: (v.run_id, v.source, v.status, v.tags, v.creation_timestamp) for v in versions
            },
        }
    return {
        "experiments": {
            e.experiment_id: (e.name, e.artifact_location, e.lifecycle_stage, e.tags) for e in experiments
        },
        "runs": runs,
        "models": models,
        "buckets": {
            role: bucket_objects(team, team.config[field])
            for role, field in (("artifacts", "artifact_bucket"), ("dvc", "dvc_bucket"))
        },
    }
