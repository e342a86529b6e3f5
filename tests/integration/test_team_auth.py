"""Who may do what on the team server, for real: one stack (PostgreSQL, SeaweedFS, MLflow with its
``basic-auth`` app) started by ``team_server start`` on free loopback ports in a temporary home, an editor
and a reader made by ``team_server users add``, and the real clients.

MLflow: anonymous requests get 401; an editor runs a stage (``emissions``, the cheapest that logs params,
metrics and an artifact) and the evaluate stage's tracking and registration path (as
``benchmarks/team_concurrency.py``'s registration writer runs it, in its own process), moving ``champion``;
a reader searches those runs and downloads their artifacts but gets 403 on creating a run, registering a
version and moving ``champion``; a stage started without a login, or with a wrong one, stops before any
compute with one ``error:`` line naming the variable. (The whole pipeline run as an editor is
tests/integration/test_team_server.py's.) S3: the DVC reader's key pulls what the writer's key pushed but
cannot push, neither DVC key reads the artifact bucket, and anonymous requests are refused. Secrets: no
password or secret key in any server process's command line or in the stack's logs.

Each check was seen failing once with its guard removed: `mlflow server` without ``--app-name basic-auth``
(anonymous gets 200); ``default_permission = EDIT`` (the reader creates a run, and its train stage trains);
the DVC reader's key given Write (its ``dvc push`` succeeds); every key given every bucket (the DVC writer
lists the artifact bucket); the database password in the backend-store URI (found in the MLflow server's
command line); no login check in ``stage_run`` and no 403 conversion (tracebacks instead of one ``error:``
line); ``users role`` not assigning the role (the promoted reader still refused).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from benchmarks.team_concurrency import save_small_model
from tests.support.localserver import free_port

from ..conftest import PROJECT_ROOT
from .test_team_server import PORT_NAMES, clean_env, git_clone, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EDITOR, READER = "edna", "ray"
EXPERIMENT = "auth-tiny"
MODEL = "cifar10-classifier"
S3_IDENTITIES = ("admin", "mlflow", "dvc_write", "dvc_read")


@dataclass
class Stack:
    home: Path
    config: dict = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.config['ports']['mlflow']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.config['ports']['s3']}"

    def cli(self, *args: str, timeout: float = 300) -> str:
        # The caller's PYTHONPATH stays after src/: where the servers' packages may be installed.
        path = os.pathsep.join(filter(None, [str(PROJECT_ROOT / "src"), os.environ.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "cifar10_pipeline.tracking.team_server", "--home", str(self.home)]
        return run([*command, *args], PROJECT_ROOT, clean_env(PYTHONPATH=path), timeout)

    def secret(self, name: str) -> str:
        return (self.home / "secrets" / name).read_text().strip()

    def password(self, user: str) -> str:
        return self.secret("mlflow_admin_password" if user == "admin" else f"users/{user}")

    def login(self, user: str) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": self.password(user)}

    def s3_keys(self, identity: str) -> tuple[str, str]:
        prefix = "s3" if identity == "admin" else f"s3_{identity}"
        return self.secret(f"{prefix}_access_key"), self.secret(f"{prefix}_secret_key")

    def s3(self, identity: str | None):
        """A boto3 client with ``identity``'s keys; None: anonymous (unsigned requests)."""
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        if identity is None:
            return boto3.client(
                "s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                config=Config(signature_version=UNSIGNED),
            )  # fmt: skip
        access, secret = self.s3_keys(identity)
        return boto3.client(
            "s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
            aws_access_key_id=access, aws_secret_access_key=secret,
        )  # fmt: skip


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # In /tmp, not pytest's tmp_path: as root, PostgreSQL runs as another user, which must reach its folder.
    home = Path(tempfile.mkdtemp(prefix="team-auth-", dir="/tmp"))
    stack = Stack(home)
    ports = [arg for name in PORT_NAMES for arg in ("--port", f"{name}={free_port()}")]
    try:
        stack.cli("start", *ports, timeout=400)
        stack.config = json.loads((home / "config.json").read_text())
        yield stack
    finally:
        try:
            stack.cli("stop", timeout=120)
        finally:
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def users(stack: Stack) -> Stack:
    """The stack with an editor and a reader made by `team_server users add`."""
    stack.cli("users", "add", EDITOR, "--role", "editor")
    stack.cli("users", "add", READER, "--role", "reader")
    return stack


@dataclass
class Pipeline:
    clone: Path
    env: dict[str, str]  # the editor's


@pytest.fixture(scope="module")
def clone(users: Stack, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """A clone of the project's committed files, with the editor's login in its environment."""
    clone = git_clone(PROJECT_ROOT, tmp_path_factory.mktemp("auth") / "clone")
    env = clean_env(PYTHONPATH=str(clone / "src"), MLFLOW_TRACKING_URI=users.uri, **users.login(EDITOR))
    return Pipeline(clone, env)


@pytest.fixture(scope="module")
def pipeline(clone: Pipeline) -> Pipeline:
    """What an editor does, logged in, in the clone: the ``emissions`` stage, then the evaluate stage's
    tracking and registration (its own process: ``benchmarks/team_concurrency.py writer``), which registers
    a small model and moves ``champion``; both under one pipeline run (``DVC_EXP_NAME``)."""
    env = {**clone.env, "DVC_EXP_NAME": EXPERIMENT}
    started = time.monotonic()
    run([sys.executable, "-m", "cifar10_pipeline.stages.emissions"], clone.clone, env)
    model = save_small_model(clone.clone.parent / "small-model")
    writer = [sys.executable, str(PROJECT_ROOT / "benchmarks/team_concurrency.py"), "writer"]
    run([*writer, "--model-dir", str(model), "--accuracy", "0.5"], clone.clone, env)
    print(f"the editor's stage and registration: {time.monotonic() - started:.0f} s")
    return clone


def http_status(url: str, method: str = "GET", body: dict | None = None, auth: str | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if auth:
        import base64

        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


# ---------------------------------------------------------------------------------------------------------
# MLflow: logins and permissions
# ---------------------------------------------------------------------------------------------------------


def test_anonymous_requests_get_401(stack: Stack) -> None:
    api = f"{stack.uri}/api/2.0/mlflow"
    assert http_status(f"{stack.uri}/health") == 200  # the health check stays open, for `status`
    assert http_status(f"{api}/experiments/search?max_results=1") == 401
    assert http_status(f"{api}/runs/search", "POST", {"experiment_ids": ["0"]}) == 401
    assert http_status(f"{api}/runs/create", "POST", {"experiment_id": "0"}) == 401
    assert http_status(f"{api}/registered-models/get?name={MODEL}") == 401
    artifacts = f"{stack.uri}/api/2.0/mlflow-artifacts/artifacts"
    assert http_status(artifacts) == 401
    assert http_status(f"{api}/experiments/search?max_results=1", auth="nobody:wrong") == 401
    admin = f"admin:{stack.password('admin')}"
    assert http_status(f"{api}/experiments/search?max_results=1", auth=admin) == 200


def test_users_role_makes_a_reader_an_editor_and_back(users: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    stack = users
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for name, value in stack.login("admin").items():
        monkeypatch.setenv(name, value)
    experiment_id = MlflowClient(stack.uri).create_experiment("roles-check")  # owned by the admin
    stack.cli("users", "add", "pat", "--role", "reader")
    for name, value in stack.login("pat").items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(stack.uri)

    def may_create_a_run() -> bool:
        try:
            client.create_run(experiment_id)
        except MlflowException as refused:
            assert refused.error_code == "PERMISSION_DENIED", refused
            return False
        return True

    assert not may_create_a_run()
    stack.cli("users", "role", "pat", "--role", "editor")
    assert may_create_a_run()
    stack.cli("users", "role", "pat", "--role", "reader")
    assert not may_create_a_run()


def test_an_editor_logs_and_registers_and_a_reader_only_reads(
    stack: Stack, pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    # The editor's runs: every one FINISHED, the evaluate stage registered the model and moved champion.
    for name, value in stack.login(READER).items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(tracking_uri=stack.uri, registry_uri=stack.uri)
    experiment = client.get_experiment_by_name("cifar10")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    stages = sorted(r.data.tags.get("stage") for r in runs if r.data.tags.get("pipeline.role") == "stage")
    assert stages == ["emissions", "evaluate"], stages
    evaluate = next(r for r in runs if r.data.tags.get("stage") == "evaluate")
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id == evaluate.info.run_id

    # The reader searches and downloads: the artifact's bytes are the clone's.
    got = mlflow.artifacts.download_artifacts(
        run_id=evaluate.info.run_id, artifact_path="eval.json", dst_path=str(tmp_path), tracking_uri=stack.uri
    )
    assert Path(got).read_bytes() == (pipeline.clone / "eval.json").read_bytes()
    emissions = next(r for r in runs if r.data.tags.get("stage") == "emissions")
    got = mlflow.artifacts.download_artifacts(
        run_id=emissions.info.run_id, dst_path=str(tmp_path / "emissions"), tracking_uri=stack.uri
    )
    assert (Path(got) / "emissions.md").read_bytes() == (pipeline.clone / "reports/emissions.md").read_bytes()

    # ...and is refused every write the pipeline makes (403, PERMISSION_DENIED), nothing changed.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    writes = {
        "create a run": lambda: client.create_run(experiment.experiment_id),
        "register a version": lambda: client.create_model_version(
            MODEL, champion.source, run_id=evaluate.info.run_id
        ),
        "move champion": lambda: client.set_registered_model_alias(MODEL, "champion", champion.version),
        "delete the alias": lambda: client.delete_registered_model_alias(MODEL, "champion"),
    }
    for what, write in writes.items():
        with pytest.raises(MlflowException) as refused:
            write()
        assert refused.value.error_code == "PERMISSION_DENIED", f"{what}: {refused.value}"
    assert len(client.search_runs([experiment.experiment_id], max_results=100)) == len(runs)
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 1
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion.version


def stage_without_login(pipeline: Pipeline, **login: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in pipeline.env.items() if not k.startswith("MLFLOW_TRACKING_") or k.endswith("URI")}
    return subprocess.run(
        [sys.executable, "-m", "cifar10_pipeline.stages.train"], cwd=pipeline.clone,
        env={**env, **login}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("login", "names"),
    [
        ({}, "MLFLOW_TRACKING_USERNAME is not set"),
        ({"MLFLOW_TRACKING_USERNAME": EDITOR}, "MLFLOW_TRACKING_PASSWORD is not set"),
        (
            {"MLFLOW_TRACKING_USERNAME": EDITOR, "MLFLOW_TRACKING_PASSWORD": "wrong"},
            "with this MLFLOW_TRACKING_PASSWORD",
        ),
        ({"MLFLOW_TRACKING_USERNAME": READER}, "create runs (403)"),  # the password added below
    ],
    ids=["no-login", "no-password", "wrong-password", "reader"],
)
def test_a_stage_without_a_valid_login_stops_before_any_compute(
    stack: Stack, clone: Pipeline, login: dict[str, str], names: str, request: pytest.FixtureRequest
) -> None:
    pipeline = clone
    if login.get("MLFLOW_TRACKING_USERNAME") == READER:
        # After the editor's run: a reader alone would create the experiment, and own it.
        pipeline = request.getfixturevalue("pipeline")
        login = stack.login(READER)
    model = pipeline.clone / "models/cifar10/model.safetensors"

    def state() -> tuple[int, bytes] | None:
        return (model.stat().st_mtime_ns, model.read_bytes()) if model.exists() else None

    before = state()
    started = time.monotonic()
    done = stage_without_login(pipeline, **login)
    seconds = time.monotonic() - started
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1, done.stdout + done.stderr
    assert len(errors) == 1 and names in errors[0] and "Nothing was computed" in errors[0], done.stderr
    assert re.search(r"^hint: .*MLFLOW_TRACKING_|^hint: .*editor", done.stderr, flags=re.M), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert state() == before  # no training: the old model (or none) kept
    assert seconds < 60, f"refused after {seconds:.0f} s"


# ---------------------------------------------------------------------------------------------------------
# S3: scoped keys
# ---------------------------------------------------------------------------------------------------------


def s3_code(call, **kwargs: object) -> str:
    """'ok', or the S3 error code ``call(**kwargs)`` got."""
    from botocore.exceptions import ClientError

    try:
        call(**kwargs)
    except ClientError as error:
        return error.response["Error"]["Code"]
    return "ok"


def test_dvc_read_key_pulls_but_cannot_push(stack: Stack, clone: Pipeline, tmp_path: Path) -> None:
    first = clone.clone
    stack.cli("dvc-remote", "--project", str(first), "--access", "write")
    shared = "models/shared.bin"  # a DVC-tracked file the writer pushes
    (first / shared).parent.mkdir(parents=True, exist_ok=True)
    (first / shared).write_bytes(os.urandom(256 * 1024))
    run([sys.executable, "-m", "dvc", "add", shared], first, clone.env)
    run([sys.executable, "-m", "dvc", "push", f"{shared}.dvc"], first, clone.env, 600)
    writer_key = stack.s3_keys("dvc_write")[1]
    assert writer_key in (first / ".dvc/config.local").read_text()
    run(["git", "add", f"{shared}.dvc", "models/.gitignore"], first, clone.env)
    run(["git", "commit", "--quiet", "-m", "a shared file"], first, clone.env)

    second = git_clone(first, tmp_path / "reader")
    env = clean_env(PYTHONPATH=str(second / "src"))
    stack.cli("dvc-remote", "--project", str(second))  # the default: the DVC reader's key
    local = (second / ".dvc/config.local").read_text()
    assert stack.s3_keys("dvc_read")[1] in local and writer_key not in local
    run([sys.executable, "-m", "dvc", "pull", f"{shared}.dvc"], second, env, 600)
    assert (second / shared).read_bytes() == (first / shared).read_bytes()

    # Something new to push: the reader's key is refused, and the object is not in the bucket.
    (second / "note.txt").write_text("a reader's note\n")
    run([sys.executable, "-m", "dvc", "add", "note.txt"], second, env)
    pushed = subprocess.run(
        [sys.executable, "-m", "dvc", "push", "note.txt.dvc"], cwd=second, env=env,
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert pushed.returncode != 0, pushed.stdout + pushed.stderr
    assert "failed to push" in (pushed.stdout + pushed.stderr).lower(), pushed.stdout + pushed.stderr
    note = yaml.safe_load((second / "note.txt.dvc").read_text())["outs"][0]["md5"]
    bucket = stack.config["dvc_bucket"]
    pages = stack.s3("admin").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    assert not any(key.endswith(note[2:]) for key in keys), "the reader's push reached the bucket"


def test_the_buckets_are_scoped_and_anonymous_access_is_refused(stack: Stack) -> None:
    artifacts, dvc_bucket = stack.config["artifact_bucket"], stack.config["dvc_bucket"]
    some_artifact = "probe/artifact.txt"
    stack.s3("mlflow").put_object(Bucket=artifacts, Key=some_artifact, Body=b"an artifact")
    denied = "AccessDenied"
    for identity in ("dvc_write", "dvc_read", None):
        client = stack.s3(identity)
        assert s3_code(client.list_objects_v2, Bucket=artifacts) == denied, identity
        assert s3_code(client.get_object, Bucket=artifacts, Key=some_artifact) == denied, identity
        assert s3_code(client.put_object, Bucket=artifacts, Key="x", Body=b"x") == denied, identity
    anonymous = stack.s3(None)
    assert s3_code(anonymous.list_buckets) == denied
    assert s3_code(anonymous.list_objects_v2, Bucket=dvc_bucket) == denied
    # The MLflow server's key reaches its bucket only.
    assert s3_code(stack.s3("mlflow").list_objects_v2, Bucket=dvc_bucket) == denied


# ---------------------------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------------------------


def stack_processes(home: Path) -> dict[int, str]:
    """pid -> command line of every process of the stack: the process groups of the pid files' servers
    (MLflow and its workers, SeaweedFS) and the postmaster with every process under it."""
    roots = {int(path.read_text().split()[0]) for path in home.glob("*.pid")}
    roots.add(int((home / "postgres/postmaster.pid").read_text().split()[0]))
    table: dict[int, tuple[int, int, str]] = {}  # pid -> (parent, group, command line)
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(") ", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[int(proc.name)] = (int(fields[1]), int(fields[2]), cmdline)
    found = {pid for pid, (_, group, _) in table.items() if group in roots or pid in roots}
    while more := {pid for pid, (parent, _, _) in table.items() if parent in found} - found:
        found |= more
    return {pid: table[pid][2] for pid in found}


def test_no_secret_in_process_arguments_or_logs(users: Stack) -> None:
    # Last in the module: by then the logs hold the pipeline's requests too, when it ran.
    stack = users
    secrets = {
        "the MLflow admin password": stack.password("admin"),
        "the editor's password": stack.password(EDITOR),
        "the reader's password": stack.password(READER),
        "the database password": stack.secret("db_password"),
        "the Flask secret key": stack.secret("flask_secret_key"),
        **{f"the {identity} S3 secret key": stack.s3_keys(identity)[1] for identity in S3_IDENTITIES},
    }
    processes = stack_processes(stack.home)
    commands = " ".join(processes.values())
    assert "--app-name basic-auth" in commands and "postgres" in commands
    # `weed -logdir=... server ...`: the global flag comes before the command.
    assert any(c.split()[0].endswith("weed") and "server" in c.split() for c in processes.values()), commands
    assert len(processes) >= 5, processes
    weed_pid = int((stack.home / "seaweedfs.pid").read_text().split()[0])
    logs = [p for p in stack.home.rglob("*.log") if p.is_file()]
    logs += [p for p in (stack.home / "postgres/log").glob("*") if p.is_file()]
    logs += [p for p in Path(tempfile.gettempdir()).glob(f"weed.*.{weed_pid}") if p.is_file()]
    assert any(p.name == "mlflow.log" and p.stat().st_size for p in logs), logs
    leaks = [
        f"{what} in {where}"
        for what, value in secrets.items()
        for where, text in [*((f"pid {pid}: {cmd[:80]}", cmd) for pid, cmd in processes.items()),
                            *((str(p), p.read_text(errors="replace")) for p in logs)]
        if value in text
    ]  # fmt: skip
    assert not leaks, leaks
