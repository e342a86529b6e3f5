"""The team setup for real: PostgreSQL, SeaweedFS's S3 gateway and an MLflow server in proxied mode, started
by ``python -m cifar10_pipeline.tracking.team_server`` on loopback (free ports, a temporary home), a tiny
``dvc exp run`` of the pipeline in a clone of the project tracked by that server, and the repo's DVC remotes.

Checked through the MLflow client: the parent and stage runs, params, metrics, every artifact (downloaded back
and compared byte for byte with the clone's files), the registered model under its ``champion`` alias; that
the rows are in PostgreSQL and the artifacts in the S3 bucket; and all of it again after the whole stack was
stopped, ``mlflow db upgrade`` run on the store, and started again. Then DVC: the repo's ``team`` S3 remote
(credentials in .dvc/config.local, never committed), ``dvc push`` from the clone, ``dvc pull`` into a fresh
clone (``dvc status`` clean, data, model and metrics identical), and ``dvc repro --pull`` in another fresh
clone whose dvc.lock predates the run: preprocess, train and evaluate come from the run cache, not run again.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.localserver import free_port

from ..conftest import PROJECT_ROOT
from ..support.helpers import run_checked
from ..support.mirrors import SMALL_MIRROR_PARAMS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPERIMENT = "team-tiny"
TINY = {
    "profile": "quick",
    "preprocess.max_train_images": "1000",
    "preprocess.val_size": "100",
    "preprocess.max_test_images": "300",
    "train.epochs": "1",
    "train.widths": "[16,32,32]",  # a narrow net: what is checked is where the results go, not accuracy
    "evaluate.robustness_images": "100",
    "download.sources": "[mirror]",
}
# The stages DVC's run cache can restore (no plain uncached outs: see dvc.yaml's train stage).
RUN_CACHED = ("preprocess", "train", "evaluate")
# Every stage that runs logs one MLflow run (the stage harness); DVC skips a stage whose lock entry still
# holds (validate, whose inputs the quick profile leaves alone), so the runs expected are the stages DVC ran.
QUICK_CHANGES = {"preprocess", "train", "evaluate"}  # the stages the tiny quick settings must re-run


def stages_run(dvc_output: str) -> list[str]:
    return re.findall(r"^Running stage '(\w+)'", dvc_output, flags=re.M)


REGISTERED_MODEL = "cifar10-classifier"
EDITOR = "team-test"  # an MLflow login with the editor role (tests/integration/test_team_auth.py: the roles)
PORT_NAMES = ("mlflow", "s3", "postgres", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc")
PORT_NAMES += ("filer", "filer_grpc")


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run a command; fail with its output's tail if it fails or overruns. Returns stdout + stderr."""
    done = run_checked(args, cwd, env, timeout)
    return done.stdout + done.stderr


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without DVC/git/MLflow/AWS settings: the clients know only what they are given (no
    S3 keys: MLflow's artifacts go through the server)."""
    prefixes = ("DVC_", "GIT_", "MLFLOW_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        MPLBACKEND="Agg",
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        **extra,
    )
    return env


@dataclass
class Team:
    home: Path
    tracking_uri: str
    s3_endpoint: str
    config: dict

    def cli(self, *args: str, timeout: float = 300) -> str:
        command = [sys.executable, "-m", "cifar10_pipeline.tracking.team_server", "--home", str(self.home)]
        # The caller's PYTHONPATH stays after src/: where the servers' packages may be installed.
        path = os.pathsep.join(filter(None, [str(PROJECT_ROOT / "src"), os.environ.get("PYTHONPATH")]))
        return run([*command, *args], PROJECT_ROOT, clean_env(PYTHONPATH=path), timeout)

    def login(self, user: str = EDITOR) -> dict[str, str]:
        """An MLflow login of this stack (the server runs MLflow's auth app), the MLflow way: by default
        the editor the fixture made; ``admin``: the stack's admin."""
        password = self.secret("mlflow_admin_password" if user == "admin" else f"users/{user}")
        return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}

    def secret(self, name: str) -> str:
        return (self.home / "secrets" / name).read_text().strip()

    def s3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=self.secret("s3_access_key"),
            aws_secret_access_key=self.secret("s3_secret_key"),
            region_name="us-east-1",
        )

    def sql(self, query: str) -> list[tuple]:
        import psycopg2

        connection = psycopg2.connect(
            host="127.0.0.1",
            port=self.config["ports"]["postgres"],
            user="mlflow",
            password=self.secret("db_password"),
            dbname="mlflow",
        )
        try:
            with connection.cursor() as cursor:
                cursor.execute(query)
                return cursor.fetchall()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def team() -> Iterator[Team]:
    if shutil.which("initdb") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.fail("PostgreSQL's server binaries are missing: apt-get install postgresql (see .ci/run)")
    # Not pytest's tmp_path: its folders are private to root, and as root PostgreSQL runs as another user,
    # which must reach its data folder.
    home = Path(tempfile.mkdtemp(prefix="team-server-", dir="/tmp"))
    ports = [arg for name in PORT_NAMES for arg in ("--port", f"{name}={free_port()}")]
    team = Team(home, "", "", {})
    started = time.monotonic()
    try:
        team.cli("start", *ports, timeout=400)
        print(f"team server started in {time.monotonic() - started:.0f} s")
        team.config = json.loads((home / "config.json").read_text())
        team.tracking_uri = f"http://127.0.0.1:{team.config['ports']['mlflow']}"
        team.s3_endpoint = f"http://127.0.0.1:{team.config['ports']['s3']}"
        team.cli("users", "add", EDITOR, "--role", "editor")
        # The in-process MLflow clients of the checks log in the MLflow way too.
        with pytest.MonkeyPatch.context() as patch:
            for name, value in team.login().items():
                patch.setenv(name, value)
            yield team
    finally:
        with_log = ""
        try:
            team.cli("stop", timeout=120)
        except AssertionError as error:
            with_log = str(error)
        shutil.rmtree(home, ignore_errors=True)
        assert not with_log, with_log


@dataclass
class Pipeline:
    clone: Path
    env: dict[str, str]
    seconds: float
    ran: frozenset[str]  # the stages `dvc exp run` ran (not skipped as unchanged)


def git_clone(source: Path, target: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(source), str(target)], check=True, timeout=120)
    for key, value in (("user.name", "team test"), ("user.email", "team-test@localhost")):
        subprocess.run(["git", "config", key, value], cwd=target, check=True, timeout=30)
    return target


def clone_env(clone: Path, team: Team) -> dict[str, str]:
    return clean_env(PYTHONPATH=str(clone / "src"), MLFLOW_TRACKING_URI=team.tracking_uri, **team.login())


@pytest.fixture(scope="module")
def pipeline(team: Team, tmp_path_factory: pytest.TempPathFactory, small_mirror: Path) -> Pipeline:
    mirror = small_mirror
    # The committed files only, as CI's fresh checkout has them.
    clone = git_clone(PROJECT_ROOT, tmp_path_factory.mktemp("team") / "clone")
    env = clone_env(clone, team)
    settings = [arg for key, value in TINY.items() for arg in ("-S", f"{key}={value}")]
    settings += ["-S", f"download.mirror_dir={mirror}"]  # the small real mirror (tests/support/mirrors.py)
    settings += [arg for override in SMALL_MIRROR_PARAMS for arg in ("-S", override)]
    started = time.monotonic()
    output = run([sys.executable, "-m", "dvc", "exp", "run", *settings, "-n", EXPERIMENT], clone, env, 900)
    (clone.parent / "exp_run.log").write_text(output)
    seconds = time.monotonic() - started
    print(f"tiny dvc exp run against the team server: {seconds:.0f} s")
    return Pipeline(clone, env, seconds, frozenset(stages_run(output)))


# ---------------------------------------------------------------------------------------------------------
# MLflow on PostgreSQL + S3
# ---------------------------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes]:
    """relative path -> bytes of every file under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def expected_artifacts(clone: Path) -> dict[str, dict[str, bytes]]:
    """stage -> artifact path -> the clone's bytes, as the stages log them (tracking.runs.StageRun)."""
    prefixed = lambda prefix, root: {f"{prefix}{k}": v for k, v in tree(root).items()}  # noqa: E731
    file = lambda rel: {Path(rel).name: (clone / rel).read_bytes()}  # noqa: E731
    return {
        "download": {},
        "preprocess": {},
        "validate": prefixed("data_docs/", clone / "reports/data_docs"),
        "train": {
            **file("metrics/train_history.csv"),
            **file("reports/training_curves.png"),
            **prefixed("model/", clone / "models/cifar10"),
        },
        "evaluate": {
            **file("metrics/eval.json"),
            **prefixed("", clone / "reports/figures"),
            **file("metrics/confusion.csv"),
            **file("metrics/per_class.csv"),
        },
        "emissions": file("reports/emissions.md"),
    }


@contextlib.contextmanager
def tracking_at(uri: str) -> Iterator[None]:
    """MLflow's global tracking and registry URIs on the team server (``models:/`` URIs resolve through the
    registry URI, which would otherwise default to a local sqlite:///mlflow.db), restored afterwards."""
    import mlflow

    # As the environment had them: get_registry_uri() would return a derived URI, and setting it back would
    # pin every later registration of this worker's tests to this store (MLFLOW_REGISTRY_URI is exported).
    before = os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])  # None unsets MLFLOW_TRACKING_URI
        mlflow.set_registry_uri(before[1])
        if before[1] is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)


def check_tracking(team: Team, pipeline: Pipeline, scratch: Path) -> None:
    """Everything the tiny run logged, read back through the MLflow client from the server."""
    with tracking_at(team.tracking_uri):
        _check_tracking(team, pipeline, scratch)


def _check_tracking(team: Team, pipeline: Pipeline, scratch: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    # registry_uri too: it defaults to a local sqlite:///mlflow.db, not to the tracking URI given here
    client = MlflowClient(tracking_uri=team.tracking_uri, registry_uri=team.tracking_uri)
    experiment = client.get_experiment_by_name("cifar10")
    assert experiment is not None, "no 'cifar10' experiment on the team server"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("pipeline.role") == "pipeline"]
    assert [p.info.run_name for p in parents] == [EXPERIMENT]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    params = parent.data.params
    assert params["profile"] == "quick"
    assert params["preprocess.max_train_images"] == "1000"  # -S beat the profile
    assert params["train.epochs"] == "1.0"
    evaluation = json.loads((pipeline.clone / "metrics/eval.json").read_text())
    assert evaluation["test_images"] == 300
    assert parent.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    assert parent.data.metrics["test_f1_macro"] == pytest.approx(evaluation["f1_macro"])

    children = {
        r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert pipeline.ran >= QUICK_CHANGES, pipeline.ran
    assert set(children) == pipeline.ran and len(runs) == 1 + len(pipeline.ran)
    train = json.loads((pipeline.clone / "metrics/train.json").read_text())
    assert children["train"].data.metrics["parameters"] == train["parameters"]

    # Every artifact, downloaded back from the server (which reads the bucket): the clone's exact bytes.
    for stage, expected in expected_artifacts(pipeline.clone).items():
        if stage not in pipeline.ran:
            continue  # skipped by DVC as unchanged: it logged nothing this time
        child = children[stage]
        assert child.info.status == "FINISHED", stage
        # Proxied mode: the run's artifacts are addressed through the server, not the bucket.
        assert child.info.artifact_uri.startswith("mlflow-artifacts:/"), child.info.artifact_uri
        target = scratch / stage
        if expected:
            mlflow.artifacts.download_artifacts(
                run_id=child.info.run_id, dst_path=str(target), tracking_uri=team.tracking_uri
            )
        got = tree(target) if target.exists() else {}
        assert sorted(got) == sorted(expected), f"{stage}: artifacts differ in name"
        different = [name for name in expected if got[name] != expected[name]]
        assert not different, f"{stage}: artifacts differ from the clone's files: {different}"

    # The registry: the champion is the version the evaluate run registered, holding the clone's model.
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert champion.run_id == children["evaluate"].info.run_id
    assert champion.tags["test_accuracy"] == f"{evaluation['accuracy']:.6f}"
    model_copy = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{REGISTERED_MODEL}@champion",
            dst_path=str(scratch / "champion"),
            tracking_uri=team.tracking_uri,
        )
    )
    weights = list(model_copy.rglob("model.safetensors"))
    assert len(weights) == 1, f"the champion's artifacts hold {len(weights)} model.safetensors"
    assert tree(weights[0].parent) == tree(pipeline.clone / "models/cifar10")

    # Where it all is: the rows in PostgreSQL, the objects in SeaweedFS's bucket.
    run_ids = {r.info.run_id for r in runs}
    assert {row[0] for row in team.sql("SELECT run_uuid FROM runs")} == run_ids
    assert team.sql("SELECT name FROM registered_models") == [(REGISTERED_MODEL,)]
    assert team.sql(f"SELECT alias FROM registered_model_aliases WHERE name = '{REGISTERED_MODEL}'") == [
        ("champion",)
    ]
    s3 = team.s3()
    bucket = team.config["artifact_bucket"]
    train_id = children["train"].info.run_id
    key = next(
        (
            obj["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for obj in page.get("Contents", [])
            if obj["Key"].endswith(f"{train_id}/artifacts/model/model.safetensors")
        ),
        None,
    )
    assert key is not None, f"the train run's model is not in s3://{bucket}"
    stored = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert stored == (pipeline.clone / "models/cifar10/model.safetensors").read_bytes()


def test_the_pipeline_is_tracked_on_postgresql_and_s3(team: Team, pipeline: Pipeline, tmp_path: Path) -> None:
    check_tracking(team, pipeline, tmp_path / "before")


def test_a_restart_and_mlflow_db_upgrade_lose_nothing(team: Team, pipeline: Pipeline, tmp_path: Path) -> None:
    # The whole stack down (MLflow, SeaweedFS, PostgreSQL), the schema migration a new MLflow release needs
    # (`upgrade` refuses while the server runs), and up again on the same home.
    assert "stopped: mlflow, seaweedfs, postgres" in team.cli("stop")
    status = subprocess.run(
        [sys.executable, "-m", "cifar10_pipeline.tracking.team_server", "--home", str(team.home), "status"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert status.returncode == 1 and not any(v["running"] for v in json.loads(status.stdout).values())
    team.cli("start", "postgres")
    upgraded = team.cli("upgrade")
    assert "Updating database tables" in upgraded
    team.cli("start")
    check_tracking(team, pipeline, tmp_path / "after")


# ---------------------------------------------------------------------------------------------------------
# DVC remotes
# ---------------------------------------------------------------------------------------------------------


def test_the_repo_configures_a_local_default_and_the_team_s3_remote() -> None:
    from dvc.config import Config

    # The committed level only (.dvc/config), as DVC reads it (relative URLs resolved against .dvc/).
    config = Config(dvc_dir=str(PROJECT_ROOT / ".dvc"), validate=False).load_one("repo")
    assert config["core"]["remote"] == "local"
    assert config["remote"]["local"] == {"url": str(PROJECT_ROOT.parent / "cifar10-dvc-remote")}
    assert config["remote"]["team"] == {"url": "s3://cifar10-dvc"}  # no endpoint, no keys
    ignored = subprocess.run(
        ["git", "check-ignore", "--quiet", ".dvc/config.local"], cwd=PROJECT_ROOT, timeout=30, check=False
    )
    assert ignored.returncode == 0, ".dvc/config.local (the S3 keys) must be git-ignored"


def dvc(clone: Path, env: dict[str, str], *args: str, timeout: float = 600) -> str:
    return run([sys.executable, "-m", "dvc", *args], clone, env, timeout)


DVC_TRACKED = ("data/raw", "data/processed", "models/cifar10", "metrics", "reports")


# Great Expectations names each validation run's Data Docs after its time: a validate stage that ran again
# writes the same checks under other folder names, so that output alone is compared by its metrics.
DATA_DOCS = "reports/data_docs"


def assert_same_results(first: Path, second: Path, validate_ran_again: bool = False) -> None:
    for folder in DVC_TRACKED:
        left, right = tree(first / folder), tree(second / folder)
        if validate_ran_again and folder == "reports":
            left, right = (
                {k: v for k, v in side.items() if not k.startswith("data_docs/")} for side in (left, right)
            )
        assert sorted(left) == sorted(right), f"{folder}: different files"
        assert [k for k in left if left[k] != right[k]] == [], f"{folder}: different contents"
    if not validate_ran_again:
        assert filecmp.cmp(first / "dvc.lock", second / "dvc.lock", shallow=False)
        return
    locks = [yaml.safe_load((clone / "dvc.lock").read_text()) for clone in (first, second)]
    for lock in locks:
        lock["stages"]["validate"]["outs"] = [
            out for out in lock["stages"]["validate"]["outs"] if out["path"] != DATA_DOCS
        ]
    assert locks[0] == locks[1]


def test_dvc_push_pull_and_repro_from_the_run_cache(team: Team, pipeline: Pipeline, tmp_path: Path) -> None:
    first = pipeline.clone
    team.cli("dvc-remote", "--project", str(first), "--access", "write")  # this clone pushes
    # The keys went to .dvc/config.local, which git ignores: nothing to commit but the run's results.
    local = (first / ".dvc/config.local").read_text()
    assert (
        team.secret("s3_dvc_write_secret_key") in local
        and team.secret("s3_dvc_write_secret_key") not in (first / ".dvc/config").read_text()
    )
    run(["git", "add", "-A"], first, pipeline.env)
    assert ".dvc/config" not in run(["git", "diff", "--cached", "--name-only"], first, pipeline.env)
    run(["git", "commit", "--quiet", "-m", f"results of {EXPERIMENT}"], first, pipeline.env)
    # `dvc push --run-cache` and the objects of the run-cache entries (team_server.push_with_run_cache).
    pushed = team.cli("dvc-push", "--project", str(first), timeout=600)
    assert "s3://cifar10-dvc" in dvc(first, pipeline.env, "remote", "list")
    objects = team.s3().list_objects_v2(Bucket=team.config["dvc_bucket"]).get("KeyCount", 0)
    assert objects > 0, f"dvc push left the bucket empty:\n{pushed}"

    # A fresh clone: pull, and it is the same project, up to date.
    second = git_clone(first, tmp_path / "second")
    env = clone_env(second, team)
    team.cli("dvc-remote", "--project", str(second))
    dvc(second, env, "pull")
    assert json.loads(dvc(second, env, "status", "--json")) == {}
    assert_same_results(first, second)

    # Another fresh clone whose dvc.lock predates the run (the params are the run's): `dvc repro --pull`
    # fetches the remote's run cache and restores what the run produced instead of training again. DVC
    # keeps no run-cache entry for a stage with a plain uncached out (download's data_source.json, the
    # reports of emissions and model_card): those cheap stages run again; validate's lock entry still holds.
    third = git_clone(first, tmp_path / "third")
    env = clone_env(third, team)
    run(["git", "checkout", "HEAD~1", "--", "dvc.lock"], third, env)
    team.cli("dvc-remote", "--project", str(third))
    assert json.loads(dvc(third, env, "status", "--json")) != {}
    from mlflow.tracking import MlflowClient

    # registry_uri too: it defaults to a local sqlite:///mlflow.db, not to the tracking URI given here
    client = MlflowClient(tracking_uri=team.tracking_uri, registry_uri=team.tracking_uri)
    experiment_id = client.get_experiment_by_name("cifar10").experiment_id

    def stage_runs() -> Counter[str]:
        runs = client.search_runs([experiment_id], max_results=1000)
        return Counter(r.data.tags.get("stage", "(pipeline parent)") for r in runs)

    before = stage_runs()
    started = time.monotonic()
    output = dvc(third, env, "repro", "--pull")
    print(f"dvc repro --pull with the run cache: {time.monotonic() - started:.0f} s")
    for stage in RUN_CACHED:
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in output, output[-3000:]
        assert f"Running stage '{stage}'" not in output, output[-3000:]
    # A stage that runs logs an MLflow run: train and evaluate did not (nor was a model registered again).
    after = stage_runs()
    assert after - before == Counter(["(pipeline parent)", *stages_run(output)])
    assert not set(stages_run(output)) & set(RUN_CACHED)
    assert len(client.search_model_versions(f"name = '{REGISTERED_MODEL}'")) == 1
    assert json.loads(dvc(third, env, "status", "--json")) == {}
    assert_same_results(first, third, validate_ran_again=True)
