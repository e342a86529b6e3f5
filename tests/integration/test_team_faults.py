"""Faults on the team server, for real: one stack (PostgreSQL, SeaweedFS, MLflow) on free loopback ports in a
temporary home, shared by every test here, and the cheapest real stage that logs to MLflow (``emissions``:
it reads the committed per-stage energy records, so a fresh clone runs it at once, and it logs params,
metrics and an artifact) run in a clone of the project against it.

- MLflow answers the names the operator lists (``--allowed-host``) and the machine's own addresses, and
  refuses any other Host header with 403; on 0.0.0.0 the URL ``env`` hands out is one of those names, not
  ``localhost``. SeaweedFS's log files land in the home's logs/; ``dvc-remote`` without a server home says
  to pass ``--home``.
- SIGKILL of the pid in ``mlflow.pid``: ``status`` names the orphaned worker, ``start`` replaces it, ``stop``
  reaches every process of the group; a foreign process on the port makes ``start`` fail with a clear error.
- A stage whose tracking server dies mid-stage (the MLflow server or its PostgreSQL killed with SIGKILL
  while the stage is held with SIGSTOP just after its run opened; the S3 gateway's case, about 50 s, is
  tests/release/test_team_faults_s3.py's, `make test-release`): the stage gives up on
  the server within seconds, finishes on the local store with its outputs complete and prints the sync
  command; after the restart and the sync, the server's runs are closed and hold every metric and the
  artifact's exact bytes, one run per stage.
- A SIGKILLed stage's parent run is closed with its child by the next stage (under another name).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cifar10_pipeline.tracking.runs import OUTAGE_BOUND_S

from ..conftest import PROJECT_ROOT
from ..support.localserver import free_port
from .team_stack import logged_in
from .test_team_server import EDITOR, PORT_NAMES, Team, clean_env, git_clone, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALIAS = "team-alias.example"  # the operator's extra name for the MLflow server
STAGE = "emissions"
STAGE_OUTPUTS = ("metrics/emissions.json", "reports/emissions.md")
# A killed server refuses connections, and one whose database is gone answers 5xx at once: giving up on
# it costs MLflow's retry backoff only (runs.HTTP_ENV), not the timeout (runs.OUTAGE_BOUND_S).
DEAD_SERVER_S = 10.0


def home_processes(home: Path) -> list[int]:
    """Every live process whose working directory is ``home`` (the stack's servers run there)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            state = (proc / "stat").read_text().rsplit(") ", 1)[-1][:1]
            if Path(os.readlink(proc / "cwd")) == home and state != "Z":
                found.append(int(proc.name))
    return found


@pytest.fixture(scope="module")
def stack() -> Iterator[Team]:
    if shutil.which("initdb") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.fail("PostgreSQL's server binaries are missing: apt-get install postgresql (see .ci/run)")
    home = Path(tempfile.mkdtemp(prefix="team-faults-", dir="/tmp"))
    ports = [arg for name in PORT_NAMES for arg in ("--port", f"{name}={free_port()}")]
    team = Team(home, "", "", {})
    try:
        team.cli("start", *ports, "--allowed-host", ALIAS, timeout=400)
        team.config = json.loads((home / "config.json").read_text())
        team.tracking_uri = f"http://127.0.0.1:{team.config['ports']['mlflow']}"
        team.s3_endpoint = f"http://127.0.0.1:{team.config['ports']['s3']}"
        team.cli("users", "add", EDITOR, "--role", "editor")
        with logged_in(team):  # the in-process MLflow clients, as the editor
            yield team
    finally:
        with contextlib.suppress(AssertionError):
            team.cli("stop", timeout=120)
        left = home_processes(home.resolve())
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)
        assert not left, f"processes of the stack outlived `stop`: {left}"


def status(team: Team) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "cifar10_pipeline.tracking.team_server", "--home", str(team.home), "status"],
        capture_output=True, text=True, timeout=60, check=False,
        env=clean_env(PYTHONPATH=str(PROJECT_ROOT / "src")),
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout)


def api_status(team: Team, host: str) -> int:
    """The HTTP status of an MLflow API call sent with ``Host: host``."""
    port = team.config["ports"]["mlflow"]
    login = team.login()
    basic = base64.b64encode(
        f"{login['MLFLOW_TRACKING_USERNAME']}:{login['MLFLOW_TRACKING_PASSWORD']}".encode()
    ).decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
        headers={"Host": host, "Authorization": f"Basic {basic}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_mlflow_answers_the_listed_names_and_the_machines_addresses(stack: Team) -> None:
    port = stack.config["ports"]["mlflow"]
    assert stack.config["extra_allowed_hosts"] == [ALIAS]
    assert api_status(stack, f"127.0.0.1:{port}") == 200
    assert api_status(stack, f"{ALIAS}:{port}") == 200
    assert api_status(stack, f"localhost:{port}") == 200
    assert api_status(stack, f"not-listed.example:{port}") == 403
    assert api_status(stack, f"{ALIAS}:{port + 1}") == 403  # the name with another port is another host
    # The default covers this machine's addresses (a teammate types the server's IP).
    import psutil

    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family.name == "AF_INET":
                assert api_status(stack, f"{entry.address}:{port}") == 200, entry.address
    # What `env` hands out is a URL the server accepts.
    # (Its URI line; a comment about the login follows it since the auth app.)
    exported = re.search(r"MLFLOW_TRACKING_URI=(\S+)", stack.cli("env")).group(1)
    assert api_status(stack, exported.removeprefix("http://")) == 200, exported


def test_seaweedfs_logs_in_the_stacks_logs_folder(stack: Team) -> None:
    # glog names its files weed.<host>.<user>.log.<LEVEL>.<date>.<pid>: the running server's are in logs/.
    pid = (stack.home / "seaweedfs.pid").read_text().split()[0]
    ours = [p.name for p in (stack.home / "logs").glob("weed.*.log.INFO.*") if p.name.endswith(f".{pid}")]
    assert ours, sorted(p.name for p in (stack.home / "logs").iterdir())


def test_dvc_remote_without_a_home_says_to_pass_one(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cifar10_pipeline.tracking.team_server", "--home", str(tmp_path / "none"),
         "dvc-remote", "--project", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
        env=clean_env(PYTHONPATH=str(PROJECT_ROOT / "src")),
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "--home" in done.stderr and "CIFAR10_TEAM_HOME" in done.stderr, done.stderr
    assert "server's home" in done.stderr, done.stderr


def test_a_server_on_every_interface_hands_out_a_url_it_accepts() -> None:
    from cifar10_pipeline.tracking.team_server import Config

    for extra, expected in (([], None), ([ALIAS, "other.example:7000"], ALIAS)):
        config = Config(host="0.0.0.0", extra_allowed_hosts=extra)
        host = config.tracking_uri.removeprefix("http://")
        assert host in config.allowed_hosts, (host, config.allowed_hosts)
        assert not host.startswith(("localhost", "127.", "0.0.0.0")), host  # a teammate must reach it
        assert expected is None or host == f"{expected}:{config.ports['mlflow']}", host
        assert config.s3_endpoint == f"http://{host.rsplit(':', 1)[0]}:{config.ports['s3']}"
    assert "other.example:7000" in config.allowed_hosts  # a name given with its port keeps it


def mlflow_group(team: Team) -> list[int]:
    pgid = int((team.home / "mlflow.pid").read_text().split()[0])
    return [pid for pid in home_processes(team.home.resolve()) if os.getpgid(pid) == pgid]


def test_a_sigkilled_mlflow_leaves_no_orphan_and_start_checks_its_port(stack: Team) -> None:
    try:
        leader = int((stack.home / "mlflow.pid").read_text().split()[0])
        workers = [pid for pid in mlflow_group(stack) if pid != leader]
        assert workers, "MLflow's server runs its uvicorn worker in its process group"
        os.kill(leader, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while leader in home_processes(stack.home.resolve()) and time.monotonic() < deadline:
            time.sleep(0.1)
        code, state = status(stack)
        assert code == 1 and not state["mlflow"]["running"] and state["mlflow"]["pid"] is None
        assert state["mlflow"]["pid_file"] == str(stack.home / "mlflow.pid")
        assert set(workers) <= set(state["mlflow"]["processes"]), state["mlflow"]
        assert str(leader) in state["mlflow"]["problem"]

        # `start` stops the orphaned worker (it still serves the port) and starts a server of its own.
        out = stack.cli("start", "mlflow")
        assert "orphaned processes" in out
        alive = home_processes(stack.home.resolve())
        assert not set(workers) & set(alive), "the orphaned worker outlived start"
        code, state = status(stack)
        assert code == 0 and state["mlflow"]["pid"] not in (None, leader)
        assert state["postgres"]["pid"] and state["seaweedfs"]["pid"], state

        # `stop` reaches the whole group; a foreign process on the port makes `start` fail, naming it.
        group = mlflow_group(stack)
        assert "stopped: mlflow" in stack.cli("stop", "mlflow")
        assert not set(group) & set(home_processes(stack.home.resolve()))
        port = stack.config["ports"]["mlflow"]
        # SO_REUSEADDR: the stopped server's connections may still sit in TIME_WAIT on the port.
        listen = (
            "import socket, time; s = socket.socket(); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f"s.bind(('127.0.0.1', {port})); s.listen(); print('ready', flush=True); time.sleep(120)"
        )
        holder = subprocess.Popen([sys.executable, "-c", listen], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
            done = subprocess.run(
                [sys.executable, "-m", "cifar10_pipeline.tracking.team_server", "--home", str(stack.home),
                 "start", "mlflow"],
                capture_output=True, text=True, timeout=120, check=False,
                env=clean_env(PYTHONPATH=str(PROJECT_ROOT / "src")),
            )  # fmt: skip
            assert done.returncode == 1, done.stdout + done.stderr
            assert f"port {port} (mlflow)" in done.stderr and f"[{holder.pid}]" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
        finally:
            holder.kill()
            holder.wait()
        stack.cli("start", "mlflow")
        assert status(stack)[0] == 0
    finally:  # the stack up again for the other tests, whatever failed here
        stack.cli("start")


@pytest.fixture(scope="module")
def clone(stack: Team, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return git_clone(PROJECT_ROOT, tmp_path_factory.mktemp("faults") / "clone")


@dataclass
class StageResult:
    returncode: int
    output: str
    seconds: float  # from the moment the held stage went on again (the server already dead) to its exit


def stage_env(clone: Path, team: Team, name: str) -> dict[str, str]:
    # This tree's package (the harness under test) runs the clone's stage; DVC_EXP_NAME names the
    # pipeline run (its parent): each test has its own.
    return clean_env(
        PYTHONPATH=str(PROJECT_ROOT / "src"),
        MLFLOW_TRACKING_URI=team.tracking_uri,
        DVC_EXP_NAME=name,
        **team.login(),
    )


def stage_with_fault(
    team: Team, clone: Path, name: str, fault: Callable[[], None], kill_stage: bool = False
) -> StageResult:
    """Run the stage; once its run is RUNNING on the server, hold it (SIGSTOP), run ``fault``, let it go on
    (or SIGKILL it: ``kill_stage``); once it ended, `start` the stack again (what the fault stopped)."""
    import psycopg2

    process = subprocess.Popen(
        [sys.executable, "-m", f"cifar10_pipeline.stages.{STAGE}"],
        cwd=clone, env=stage_env(clone, team, name), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    connection = psycopg2.connect(
        host="127.0.0.1", port=team.config["ports"]["postgres"], user="mlflow",
        password=team.secret("db_password"), dbname="mlflow",
    )  # fmt: skip
    connection.autocommit = True
    # The child run with its first params: the stage has its run id (a run row alone may mean that the
    # stage has not read the server's answer yet).
    query = (
        "SELECT 1 FROM runs r JOIN tags k ON k.run_uuid = r.run_uuid JOIN tags s ON s.run_uuid = r.run_uuid"
        " WHERE r.status = 'RUNNING' AND k.key = 'pipeline.key' AND k.value = %s AND s.key = 'stage'"
        " AND EXISTS (SELECT 1 FROM params p WHERE p.run_uuid = r.run_uuid)"
    )
    try:
        deadline = time.monotonic() + 120
        with connection.cursor() as cursor:
            while True:
                cursor.execute(query, (name,))
                if cursor.fetchone():
                    break
                assert process.poll() is None, f"the stage ended before it was held:\n{process.stdout.read()}"
                assert time.monotonic() < deadline, "the stage's run never appeared on the server"
                time.sleep(0.005)
        os.kill(process.pid, signal.SIGSTOP)
    finally:
        connection.close()
    try:
        fault()
    finally:
        resumed = time.monotonic()
        os.kill(process.pid, signal.SIGKILL if kill_stage else signal.SIGCONT)
        try:
            output, _ = process.communicate(timeout=300)
        finally:
            seconds = time.monotonic() - resumed
            process.kill()
            team.cli("start", timeout=400)
    return StageResult(process.returncode, output, seconds)


def kill_group(pid_file: Path) -> None:
    """SIGKILL every process of the group led by the pid in ``pid_file``, and wait until they are gone."""
    pgid = int(pid_file.read_text().split()[0])
    os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def server_runs(team: Team, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=team.tracking_uri)
    experiment = client.get_experiment_by_name("cifar10")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`pipeline.key` = '{name}'")


def check_offline_then_synced(
    team: Team, clone: Path, name: str, result: StageResult, scratch: Path, bound: float = OUTAGE_BOUND_S
) -> None:
    """The stage gave up on the server within ``bound`` seconds, finished on the local store and printed
    the sync command; after the stack's restart and the sync the server holds one closed run per stage
    with all its data."""
    out = result.output
    assert result.returncode == 0, out
    assert "Traceback" not in out, out
    assert "stopped answering mid-stage" in out, out
    gave_up = float(re.search(r"gave up after ([\d.]+) s", out).group(1))
    print(f"{name}: gave up on the server after {gave_up:.1f} s; stage exit {result.seconds:.1f} s after")
    assert gave_up <= bound <= OUTAGE_BOUND_S, out
    assert result.seconds <= OUTAGE_BOUND_S, out
    assert f"at most {OUTAGE_BOUND_S} s" in (PROJECT_ROOT / "docs/team.md").read_text()  # the stated bound
    sync = f"python -m cifar10_pipeline.tracking.offline --to {team.tracking_uri}"
    assert sync in out, out
    # Outputs complete: the stage's results are the committed ones, byte for byte (same inputs).
    changed = run(["git", "status", "--porcelain", "--", *STAGE_OUTPUTS], clone, clean_env())
    assert changed.strip() == "", changed
    for path in STAGE_OUTPUTS:
        assert (clone / path).stat().st_size > 0

    assert status(team)[0] == 0
    env = stage_env(clone, team, name)
    synced = run(
        [sys.executable, "-m", "cifar10_pipeline.tracking.offline", "--to", team.tracking_uri], clone, env
    )
    assert "2 run(s) copied" in synced, synced
    runs = server_runs(team, name)
    assert sorted(r.data.tags.get("pipeline.role") for r in runs) == ["pipeline", "stage"], runs
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    child = next(r for r in runs if r.data.tags.get("pipeline.role") == "stage")
    parent = next(r for r in runs if r.data.tags.get("pipeline.role") == "pipeline")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    for metric in ("emissions_emissions_kg", "emissions_energy_kwh", "emissions_duration_s"):
        assert metric in child.data.metrics and metric in parent.data.metrics, metric
    import mlflow

    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=child.info.run_id, dst_path=str(scratch), tracking_uri=team.tracking_uri
        )
    )
    assert sorted(p.name for p in local.rglob("*") if p.is_file()) == ["emissions.md"]
    assert (local / "emissions.md").read_bytes() == (clone / "reports/emissions.md").read_bytes()
    # No half-written object in the bucket: every object under the run is the file's full size.
    s3 = team.s3()
    objects = [
        obj
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=team.config["artifact_bucket"])
        for obj in page.get("Contents", [])
        if f"/{child.info.run_id}/" in obj["Key"]
    ]
    assert [o["Size"] for o in objects] == [(clone / "reports/emissions.md").stat().st_size], objects


def test_a_tracking_server_killed_mid_stage_costs_seconds(stack: Team, clone: Path, tmp_path: Path) -> None:
    result = stage_with_fault(stack, clone, "fault-mlflow", lambda: kill_group(stack.home / "mlflow.pid"))
    check_offline_then_synced(stack, clone, "fault-mlflow", result, tmp_path, bound=DEAD_SERVER_S)


def test_postgresql_killed_mid_stage(stack: Team, clone: Path, tmp_path: Path) -> None:
    data = (stack.home / "postgres").resolve()

    def kill_postgres() -> None:
        os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        # Its backends notice the postmaster's death and exit; until they have, a new one cannot start.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and home_processes(data):
            time.sleep(0.05)

    result = stage_with_fault(stack, clone, "fault-postgres", kill_postgres)
    # The MLflow server answers 500 at once without its database.
    check_offline_then_synced(stack, clone, "fault-postgres", result, tmp_path, bound=DEAD_SERVER_S)


def test_a_sigkilled_stage_has_its_parent_closed_by_the_next_stage(stack: Team, clone: Path) -> None:
    # The stage SIGKILLed while its run is open: its child and parent stay RUNNING on the server.
    result = stage_with_fault(stack, clone, "killed-stage", lambda: None, kill_stage=True)
    assert result.returncode == -signal.SIGKILL, result.output
    assert sorted(r.info.status for r in server_runs(stack, "killed-stage")) == ["RUNNING", "RUNNING"]
    # The stage again, under another name (a new `dvc exp run -n`): it closes both, child and parent.
    run(
        [sys.executable, "-m", f"cifar10_pipeline.stages.{STAGE}"], clone, stage_env(clone, stack, "next-run")
    )
    assert sorted(r.info.status for r in server_runs(stack, "killed-stage")) == ["KILLED", "KILLED"]
    assert [r.info.status for r in server_runs(stack, "next-run")] == ["FINISHED", "FINISHED"]
