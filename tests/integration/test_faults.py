"""Faults in the pipeline: stages killed at chosen points, signals, an unreachable tracking server, two runs
at once, a full disk. Each test is one case of reports/reliability.md (the ``reliability`` marker).

The kill cases run the real pipeline with ``dvc repro`` on a small real mirror (tests/support/mirrors.py).
One checkout is prepared per session: a clone of the committed project whose tiny run is complete (the
uninterrupted baseline). Each case copies it, deletes one stage's outputs and lock entry, runs it with
``dvc repro --single-item`` while tests/support/fault_injection/sitecustomize.py kills it (or the whole ``dvc
repro`` process group) with SIGKILL at its point of ``KILLS``, mostly while it writes half of an output, and
checks that each output the pipeline declares is either absent or complete (equal to the baseline's). The
stage's next run (``dvc repro --single-item``) then finishes it: its outputs equal the baseline's, byte for
byte except the measured ones (``MEASURED``: timings, energy, Great Expectations' run timestamps), DVC sees
the stage done and no MLflow run is left RUNNING. The cases are independent, so xdist runs them side by
side. The release check (tests/release/test_kill_chain.py, ``make test-release``) kills every point in turn
in one checkout and runs the whole pipeline on after each kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from ..conftest import PROJECT_ROOT
from ..support.faults import (
    INJECTION,
    KILLS,
    MEASURED,
    Kill,
    comparable,
    copy_checkout,
    declared_outputs,
    delete_outputs,
    differences,
    dvc_repro,
    dvc_status,
    env_for,
    make_clone,
    mlflow_statuses,
    scratch_leftovers,
)
from ..support.localserver import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def prepared_checkout(small_mirror: Path, session_dir: Path) -> Path:
    """A clone whose tiny run is complete, made once per session by whichever worker asks first."""
    baseline = session_dir / "faults-baseline"
    with FileLock(str(session_dir / "faults-baseline.lock")):
        if not (baseline / "dvc.lock.done").is_file():
            if baseline.exists():  # a worker died while preparing it
                subprocess.run(["rm", "-rf", str(baseline)], check=True)
            make_clone(baseline, small_mirror)
            delete_outputs(baseline, declared_outputs(baseline))
            started = time.monotonic()
            done = dvc_repro(baseline, env_for(baseline))
            assert done.returncode == 0, done.stdout[-4000:]
            print(f"faults baseline: {time.monotonic() - started:.1f} s")
            (baseline / "dvc.lock.done").write_text("")
    return baseline


MODEL_STAGES = ("train", "evaluate")  # the kills that train or load a network: half the cost on their own


def kill_cases(model_stages: bool) -> list:
    return [
        pytest.param(
            kill,
            id=f"{kill.stage}-{kill.point}",
            marks=pytest.mark.reliability(
                kill.case,
                "no output looked complete but was not; the stage's next run finished it, its outputs equal "
                "to an uninterrupted run's, DVC sees it done, the killed MLflow run closed KILLED",
            ),
        )
        for kill in KILLS
        if (kill.stage in MODEL_STAGES) == model_stages
    ]


# Two classes, so that `make test` (xdist's loadscope: a class is one unit) runs the two halves side by side,
# from the one prepared checkout.
@pytest.mark.slow
class TestKillDataAndReportStages:
    @pytest.mark.parametrize("kill", kill_cases(model_stages=False))
    def test_a_killed_stage_leaves_no_output_that_looks_complete(
        self, prepared_checkout: Path, kill: Kill, tmp_path: Path
    ) -> None:
        check_kill(prepared_checkout, kill, tmp_path)


@pytest.mark.slow
class TestKillModelStages:
    @pytest.mark.parametrize("kill", kill_cases(model_stages=True))
    def test_a_killed_stage_leaves_no_output_that_looks_complete(
        self, prepared_checkout: Path, kill: Kill, tmp_path: Path
    ) -> None:
        check_kill(prepared_checkout, kill, tmp_path)


def check_kill(prepared_checkout: Path, kill: Kill, tmp_path: Path) -> None:
    """Kill ``kill.stage`` at ``kill.point`` in a copy of the prepared checkout, then run it again."""
    baseline = prepared_checkout
    clone = copy_checkout(baseline, tmp_path / "clone")
    # The killed stage's outputs, its dvc.lock entry and the baseline's run cache dropped: DVC must run the
    # stage (not restore it), and the kill meets a stage that has not finished in this checkout, as in the
    # chain.
    # (A stage killed after an earlier run of it completed keeps that run's outputs, whole: DVC then sees
    # nothing to do, and nothing closes the killed MLflow run until that stage runs again.)
    delete_outputs(clone, declared_outputs(clone, kill.stage))
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    del lock["stages"][kill.stage]
    (clone / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    shutil.rmtree(clone / ".dvc" / "cache" / "runs")
    outputs = declared_outputs(clone)
    env = env_for(clone, CIFAR10_TEST_FAULT=f"{kill.stage}:{kill.point}")
    env["PYTHONPATH"] = f"{INJECTION}{os.pathsep}{env['PYTHONPATH']}"
    killed = dvc_repro(clone, env, "--single-item", kill.stage)
    assert f"Running stage '{kill.stage}'" in killed.stdout, killed.stdout[-3000:]
    assert killed.returncode == (-signal.SIGKILL if kill.group else 255), killed.stdout[-3000:]
    assert differences(baseline, clone, outputs) == [], killed.stdout[-2500:]
    assert mlflow_statuses(clone).get("RUNNING", 0) >= 1  # what SIGKILL leaves: the run cannot close itself

    # The next run of the stage finishes it (the release chain runs the whole pipeline on after each kill).
    done = dvc_repro(clone, env_for(clone), "--single-item", kill.stage)
    assert done.returncode == 0, done.stdout[-4000:]
    for relative in outputs:
        assert (clone / relative).exists(), relative
    assert differences(baseline, clone, outputs) == []
    for relative in (p for p in declared_outputs(clone, kill.stage) if p not in MEASURED):
        assert comparable(baseline, relative) == comparable(clone, relative), relative
    assert scratch_leftovers(clone) == []
    assert kill.stage not in dvc_status(clone, kill.stage)
    statuses = mlflow_statuses(clone)
    assert "RUNNING" not in statuses and statuses.get("KILLED", 0) >= 1, statuses


# ---------------------------------------------------------------------------------------------------------
# Signals, codecarbon, tracking server, locks and disk space: one stage run as a real subprocess
# ---------------------------------------------------------------------------------------------------------

SIGNAL_STAGE = textwrap.dedent(
    """
    import os, signal, sys
    import tqdm.std

    from cifar10_pipeline.stages import train

    sig = getattr(signal, sys.argv[1])
    # As at a terminal, where Ctrl-C raises KeyboardInterrupt: a child of a background job (`cmd &`,
    # nohup) inherits SIGINT ignored, and Python then installs no handler for it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    original = tqdm.std.tqdm.update

    def update(self, n=1):
        result = original(self, n)
        if self.desc == "train" and self.n == 2:
            print("sending", sys.argv[1], flush=True)
            os.kill(os.getpid(), sig)
        return result

    tqdm.std.tqdm.update = update
    train.main()
    """
)


def small_project(root: Path, **sections: dict) -> Path:
    """A scratch project (a `.dvc/` folder, params.yaml and tiny processed splits) for the train stage."""
    from cifar10_pipeline.core.data import ArraySplit, save_split

    from ..conftest import synthetic_images
    from ..support.helpers import write_params

    root.mkdir(parents=True, exist_ok=True)
    (root / ".dvc").mkdir(exist_ok=True)
    (root / "data" / "processed").mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 60), ("val", 20), ("test", 20)):
        images, labels = synthetic_images(n, seed=len(name))
        save_split(root / "data" / "processed" / f"{name}.npz", ArraySplit(images, labels, labels * 0))
    write_params(
        root,
        train={"epochs": 2, "batch_size": 20, "widths": [8, 16, 16], "tta_level": 0, "device": "cpu"},
        **sections,
    )
    return root


def stage_env(root: Path, **extra: str) -> dict[str, str]:
    """The working tree's code, the scratch project's own MLflow store and temp folder."""
    env = env_for(PROJECT_ROOT, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", TMPDIR=str(root))
    return env | extra


def run_python(code: str, root: Path, env: dict[str, str], *args: str, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar10")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "exit_status"),
    [
        pytest.param(
            "SIGTERM",
            128 + signal.SIGTERM,
            marks=pytest.mark.reliability(
                "SIGTERM to the train stage mid-training (docker stop, a CI timeout)",
                "its MLflow runs are closed KILLED, not left RUNNING; no output is left; exit status 143",
            ),
        ),
        pytest.param(
            "SIGINT",
            1,  # an uncaught KeyboardInterrupt, as `python -c` reports it
            marks=pytest.mark.reliability(
                "Ctrl-C (SIGINT) in the train stage mid-training",
                "its MLflow runs are closed KILLED, not left RUNNING; no output is left",
            ),
        ),
    ],
)
def test_a_signalled_stage_closes_its_mlflow_runs_killed(tmp_path: Path, name: str, exit_status: int) -> None:
    root = small_project(tmp_path / "project")
    done = run_python(SIGNAL_STAGE, root, stage_env(root), name)
    output = done.stdout + done.stderr
    assert f"sending {name}" in output, output[-3000:]
    assert done.returncode == exit_status, output[-3000:]
    if name == "SIGINT":
        assert "KeyboardInterrupt" in output
    runs = train_runs(root)
    assert {r.data.tags.get("pipeline.role") for r in runs} == {"pipeline", "stage"}
    assert {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
    for relative in ("models/cifar10", "metrics/train.json", "metrics/emissions/train.json"):
        assert not (root / relative).exists(), relative


CODECARBON_CONFIG = "[codecarbon]\nallow_multiple_runs = false\n"

KILL_IN_CODECARBON = textwrap.dedent(
    """
    import os, signal, time
    from pathlib import Path
    from cifar10_pipeline.tracking import emissions

    with emissions.measure("train", "USA", Path("metrics/emissions/train.json")):
        print("measuring", flush=True)
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)

MEASURE = textwrap.dedent(
    """
    from pathlib import Path
    from cifar10_pipeline.tracking import emissions

    with emissions.measure("train", "USA", Path("metrics/emissions/train.json")):
        sum(i * i for i in range(200000))
    """
)


@pytest.mark.slow
@pytest.mark.reliability(
    "SIGKILL while codecarbon measures, with a user config that turns codecarbon's lock file on",
    "the stale lock does not block the next run: it records its emissions",
)
def test_a_stale_codecarbon_lock_does_not_block_the_next_run(tmp_path: Path) -> None:
    import tempfile

    root = tmp_path / "project"
    root.mkdir()
    (root / ".codecarbon.config").write_text(CODECARBON_CONFIG)  # as a user's config may say
    env = stage_env(root)
    killed = run_python(KILL_IN_CODECARBON, root, env)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    # What a run with codecarbon's lock on leaves behind when it is killed: its lock file in the temp folder.
    lock = Path(env["TMPDIR"]) / ".codecarbon.lock"  # codecarbon.lock.LOCKFILE, in the child's temp folder
    assert Path(tempfile.gettempdir()) != lock.parent  # the test's own temp folder, not the machine's
    lock.write_text("")
    done = run_python(MEASURE, root, env)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((root / "metrics/emissions/train.json").read_text())
    assert record["energy_kwh"] > 0 and record["duration_s"] > 0


UNREACHABLE = textwrap.dedent(
    """
    from cifar10_pipeline.stages import train
    train.main()
    """
)


def closed_port_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.mark.reliability(
    "MLflow tracking server unreachable (MLFLOW_TRACKING_URI a closed loopback port), tracking.required true",
    "the stage stops at once, before any compute, naming MLFLOW_TRACKING_URI and how to fix it",
)
def test_an_unreachable_tracking_server_stops_the_stage_before_compute(tmp_path: Path) -> None:
    root = small_project(tmp_path / "project")
    uri = closed_port_uri()
    started = time.monotonic()
    done = run_python(UNREACHABLE, root, stage_env(root, MLFLOW_TRACKING_URI=uri))
    seconds = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) does not answer" in done.stderr
    assert "Nothing was computed" in done.stderr and "tracking.required=false" in done.stderr
    assert "Traceback" not in done.stderr
    assert "train:" not in done.stderr.replace("train: the MLflow", "")  # no progress bar: no compute
    assert not (root / "models").exists() and not (root / "mlflow.db").exists()
    assert seconds < 60, f"took {seconds:.0f} s to give up"


@pytest.mark.slow
@pytest.mark.reliability(
    "MLflow tracking server unreachable, tracking.required false",
    "the stage finishes with the local store and prints the command that copies its runs to the server later",
)
def test_without_required_tracking_the_stage_finishes_and_its_runs_sync_later(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from cifar10_pipeline.tracking import offline

    root = small_project(tmp_path / "project", tracking={"required": False})
    uri = closed_port_uri()
    done = run_python(UNREACHABLE, root, stage_env(root, MLFLOW_TRACKING_URI=uri))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (root / "models/cifar10/model.safetensors").is_file()
    hint = f"python -m cifar10_pipeline.tracking.offline --to {uri}"
    assert hint in done.stdout, done.stdout
    local = f"sqlite:///{root / 'mlflow.db'}"
    runs = MlflowClient(tracking_uri=local).search_runs(
        [MlflowClient(tracking_uri=local).get_experiment_by_name("cifar10").experiment_id]
    )
    assert len(runs) == 2 and all(r.data.tags["pipeline.offline_for"] == uri for r in runs)
    # The server is back (here: another real store, the sync speaks MLflow's client API to either).
    server = f"sqlite:///{tmp_path / 'server.db'}"
    copied = offline.sync(server, local)
    assert len(copied) == 2
    target = MlflowClient(tracking_uri=server)
    synced = target.search_runs([target.get_experiment_by_name("cifar10").experiment_id])
    child = next(r for r in synced if r.data.tags.get("stage") == "train")
    parent = next(r for r in synced if r.data.tags.get("pipeline.role") == "pipeline")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    original = next(r for r in runs if r.data.tags.get("stage") == "train")
    assert child.data.metrics == original.data.metrics and child.data.params == original.data.params
    assert child.info.status == "FINISHED"
    names = {a.path for a in target.list_artifacts(child.info.run_id)}
    assert {"train_history.csv", "model"} <= names
    assert offline.sync(server, local) == []  # nothing is copied twice


HOLD_LOCK = textwrap.dedent(
    """
    import time
    from cifar10_pipeline.tracking.runs import stage_lock
    with stage_lock("train"):
        print("holding", flush=True)
        time.sleep(120)
    """
)


@pytest.mark.reliability(
    "a stage started with `python -m` while another stage runs in the same checkout",
    "the second stops at once, naming the running stage and its pid; the first's outputs are untouched",
)
def test_a_second_stage_in_one_checkout_is_refused(tmp_path: Path) -> None:
    root = small_project(tmp_path / "project")
    (root / "models" / "cifar10").mkdir(parents=True)
    (root / "models" / "cifar10" / "config.json").write_text("{}")  # the running stage's output
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK], cwd=root, env=stage_env(root), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        done = run_python(UNREACHABLE, root, stage_env(root))
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"stage train (pid {holder.pid}) is running in this checkout" in done.stderr
        assert "Traceback" not in done.stderr
        assert (root / "models" / "cifar10" / "config.json").read_text() == "{}"
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL released the lock with its holder: the next stage runs.
    done = run_python(UNREACHABLE, root, stage_env(root))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.reliability(
    "two `dvc repro` at once in one checkout",
    "the second fails at once, DVC naming the run (PID) that blocks it; the first finishes, outputs intact",
)
def test_two_dvc_repro_at_once(tmp_path: Path, small_mirror: Path) -> None:
    clone = make_clone(tmp_path / "clone", small_mirror)
    env = env_for(clone)
    first = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "preprocess"],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Once the first runs its first stage, it holds DVC's repository lock.
        for line in first.stdout:
            if "Running stage 'download'" in line:
                break
        second = subprocess.run(
            [sys.executable, "-m", "dvc", "repro", "preprocess"],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        rest = first.stdout.read()
        assert first.wait(timeout=600) == 0, rest[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode != 0
    message = second.stdout + second.stderr
    # DVC locks the repository while it plans, and each stage's deps and outs (.dvc/tmp/rwlock) while it
    # runs: the second run meets one or the other, and either message says what blocks it.
    busy = "is busy, it is being blocked by" in message and f"(PID {first.pid})" in message
    assert busy or "Unable to acquire lock. Most likely another DVC process is running" in message, message
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "download", "preprocess", "--json"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    changed = json.loads(status.stdout)
    assert not {"download", "preprocess"} & set(changed), changed


# ---------------------------------------------------------------------------------------------------------
# Disk full
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "3m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (needs root, as in CI's container); skips where that fails."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


DISK_FULL = textwrap.dedent(
    """
    from cifar10_pipeline.stages import train
    train.main()
    """
)


@pytest.mark.slow
@pytest.mark.reliability(
    "disk full while the train stage writes its model (a 3 MB file system)",
    "an error naming the output, the device's free space and the fix; no half output, no scratch left",
)
def test_disk_full_while_writing_the_model(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small") as small:
        root = small_project(tmp_path / "project")
        # The processed data stay on the big disk; the outputs go to the small one.
        for folder in ("models", "metrics", "reports"):
            (small / folder).mkdir()
            (root / folder).symlink_to(small / folder)
        # A 1.9 M-parameter net: ~7.6 MB of float32 weights, more than the file system holds.
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["train"]["widths"] = [64, 256, 256]
        params["train"]["epochs"] = 1
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        done = run_python(DISK_FULL, root, stage_env(root))
        output = done.stdout + done.stderr
        assert done.returncode != 0, output[-3000:]
        expected = "DiskFullError: no space left on the device that holds models while writing models/cifar10"
        assert expected in output, output[-3000:]
        assert "No space left on device" in output and "Free some space there" in output, output[-3000:]
        leftovers = sorted(p.relative_to(small).as_posix() for p in small.rglob("*") if p.is_file())
        assert leftovers == [], leftovers
        assert sorted(p.name for p in (small / "models").iterdir()) == []


@pytest.mark.slow
@pytest.mark.reliability(
    "SIGKILL of the train stage mid-training (its MLflow run cannot close itself), then the stage again",
    "the next run marks the dead run KILLED; none is left RUNNING; the second run finishes",
)
def test_the_run_of_a_sigkilled_stage_is_closed_by_the_next_run(tmp_path: Path) -> None:
    root = small_project(tmp_path / "project")
    done = run_python(SIGNAL_STAGE, root, stage_env(root), "SIGKILL")
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    killed = [r for r in train_runs(root) if r.data.tags.get("stage") == "train"]
    assert [r.info.status for r in killed] == ["RUNNING"]  # what SIGKILL leaves
    assert not (root / "models").exists()  # nothing written yet, nothing half-written
    done = run_python(UNREACHABLE, root, stage_env(root))
    assert done.returncode == 0, done.stdout + done.stderr
    status = {r.info.run_id: r.info.status for r in train_runs(root) if r.data.tags.get("stage") == "train"}
    assert status.pop(killed[0].info.run_id) == "KILLED"
    assert list(status.values()) == ["FINISHED"]
