"""Faults in the pipeline: stages killed at chosen points, signals, an unreachable tracking server, two runs
at once, a full disk. Each test is one case of reports/reliability.md (the ``reliability`` marker).

The kill-and-repro test runs the real pipeline with ``dvc repro`` in two clones of the project on a tiny real
subset of the CIFAR-10 mirror: one uninterrupted (the baseline), one killed at every point of ``KILLS`` in
turn (tests/fault_injection/sitecustomize.py kills the stage, or the whole ``dvc repro`` process group, with
SIGKILL while it writes half of an output) and finished by a last ``dvc repro``. After every kill, each
output the pipeline declares is either absent or complete (equal to the baseline's); at the end every
output equals the baseline's, byte for byte except the measured ones (``MEASURED``: timings, energy, Great
Expectations' run timestamps), which are compared with those values left out. The chain runs only the kills
whose tests the session selected, so ``-k "download or safetensors"`` runs a sample (about 10 min for all
eleven on 2 shared cores, 3 of them the uninterrupted baseline).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from ..conftest import PROJECT_ROOT, mirror_dir
from ..localserver import free_port

pytestmark = pytest.mark.integration

INJECTION = PROJECT_ROOT / "tests" / "fault_injection"

# A tiny real run: seconds per stage (validate, which checks the full raw splits, aside).
TINY = (
    "profile=quick",
    "preprocess.max_train_images=400",
    "preprocess.val_size=100",
    "preprocess.max_test_images=100",
    "train.epochs=2",
    "train.batch_size=50",
    "train.widths=[16,32,32]",
    "train.tta_level=0",
    "evaluate.robustness_images=20",
    "evaluate.batch_size=100",
    "evaluate.gallery_per_class=1",
    "download.sources=[mirror]",
)
STEPS_PER_EPOCH = 6  # 300 training images (400 less the 100 held out) in batches of 50


@dataclass(frozen=True)
class Kill:
    stage: str
    point: str  # tests/fault_injection/sitecustomize.py's point
    case: str  # for reports/reliability.md
    group: bool = False  # the whole `dvc repro` process group dies, not the stage alone
    prepare: tuple[str, ...] = ()  # outputs deleted first, so that DVC runs a stage whose lock entry holds


# In pipeline order: each `dvc repro` re-runs the stage killed before and runs on to the next kill.
KILLS = (
    Kill("download", "copy=2", "SIGKILL of download while it copies a Parquet shard (half copied)"),
    Kill("download", "write_text=data_source.json", "SIGKILL of download while it writes data_source.json"),
    Kill(
        "validate",
        "write_text=validation.json",
        "SIGKILL of validate while it writes metrics/validation.json",
        prepare=("metrics/validation.json",),
    ),
    Kill("preprocess", "savez=val.npz", "SIGKILL of preprocess while it writes data/processed/val.npz"),
    Kill(
        "train",
        f"train_step_group={STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2}",
        "SIGKILL of the whole `dvc repro` (process group) mid-epoch 2 of training",
        group=True,
    ),
    Kill("train", "safetensors", "SIGKILL of train while it writes model.safetensors (half written)"),
    Kill("train", "write_text=train.json", "SIGKILL of train while it writes metrics/train.json"),
    Kill("evaluate", "savefig=reliability.png", "SIGKILL of evaluate while it writes a figure"),
    Kill(
        "evaluate",
        "register",
        "SIGKILL of evaluate after its outputs, while it registers the model in MLflow",
    ),
    Kill("emissions", "write_text=emissions.md", "SIGKILL of emissions while it writes reports/emissions.md"),
    Kill(
        "model_card",
        "write_text=model_card.md",
        "SIGKILL of model_card while it writes reports/model_card.md",
    ),
)

# Outputs whose content is measured, not computed: compared with these values left out.
TIMING_KEYS = {
    "train_seconds",
    "train_images_per_second",
    "stage_wall_seconds",
    "seconds",
    "images_per_second",
}
MEASURED_JSON = {"metrics/train.json", "metrics/eval.json"}
ENERGY_JSON = {"metrics/emissions.json", "metrics/emissions/train.json", "metrics/emissions/evaluate.json"}
MASKED_TEXT = {"reports/emissions.md", "reports/model_card.md"}  # every number masked
TIMED_CSV = {"metrics/train_history.csv": "seconds"}
DATA_DOCS = "reports/data_docs"  # Great Expectations names its run folders and pages after the time
TIMESTAMP = re.compile(r"\d{8}T\d{6}\.\d+Z")
MEASURED = {
    **{path: f"without {sorted(TIMING_KEYS)}" for path in MEASURED_JSON},
    **{path: "without the measured energy, CO2 and seconds" for path in ENERGY_JSON},
    **{path: "with every number masked (emissions and timings quoted)" for path in MASKED_TEXT},
    "metrics/train_history.csv": "without the seconds column",
    DATA_DOCS: "file names with the run timestamps masked; pages not compared",
}


def declared_outputs(root: Path) -> list[str]:
    """Every out, metric and plot file or folder dvc.yaml declares."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    paths = []
    for stage in spec["stages"].values():
        for section in ("outs", "metrics", "plots"):
            for entry in stage.get(section, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


def _without(value: object, keys: set[str]) -> object:
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def _floats_masked(value: object) -> object:
    if isinstance(value, dict):
        return {k: _floats_masked(v) for k, v in value.items()}
    return "<measured>" if isinstance(value, float) else value


def comparable(root: Path, relative: str) -> object:
    """What of ``root/relative`` must equal the baseline's (see MEASURED)."""
    path = root / relative
    if relative == DATA_DOCS:
        return sorted(TIMESTAMP.sub("<time>", p.relative_to(path).as_posix()) for p in path.rglob("*"))
    if path.is_dir():
        return {
            p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
        }
    if relative in MEASURED_JSON:
        return _without(json.loads(path.read_text()), TIMING_KEYS)
    if relative in ENERGY_JSON:
        return _floats_masked(json.loads(path.read_text()))
    if relative in MASKED_TEXT:
        return re.sub(r"\d+(\.\d+)?", "#", path.read_text())
    if relative in TIMED_CSV:
        with open(path, newline="") as handle:
            return [
                {k: v for k, v in row.items() if k != TIMED_CSV[relative]} for row in csv.DictReader(handle)
            ]
    return path.read_bytes()


def differences(first: Path, second: Path, paths: list[str]) -> list[str]:
    """The outputs present in ``second`` that are not what they are in ``first``."""
    problems = []
    for relative in paths:
        if not (second / relative).exists():
            continue
        if not (first / relative).exists():
            problems.append(f"{relative}: exists, but not in the baseline")
        else:
            try:
                same = comparable(first, relative) == comparable(second, relative)
            except (ValueError, UnicodeDecodeError) as exc:  # a half-written JSON or CSV
                same, relative = False, f"{relative} ({type(exc).__name__}: {exc})"
            if not same:
                problems.append(f"{relative}: differs from the baseline (incomplete or different)")
    return problems


def env_for(clone: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_", "MLFLOW_", "CODECARBON"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(clone / "src"),
        MLFLOW_TRACKING_URI=f"sqlite:///{clone / 'mlflow.db'}",
        MPLBACKEND="Agg",
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def make_clone(target: Path, mirror: Path) -> Path:
    """A clone of the committed project with params.yaml composed for the tiny run."""
    subprocess.run(["git", "clone", "--quiet", str(PROJECT_ROOT), str(target)], check=True, timeout=120)
    subprocess.run(
        [sys.executable, "-m", "cifar10_pipeline.core.params", *TINY, f"download.mirror_dir={mirror}"],
        cwd=target,
        env=env_for(target),
        check=True,
        capture_output=True,
        timeout=120,
    )
    return target


def dvc_repro(clone: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """``dvc repro`` in its own process group (so that a fault may kill the group without killing pytest)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"dvc repro ran past {timeout}s:\n{output[-3000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


@dataclass
class KillRun:
    baseline: Path
    clone: Path
    outputs: list[str]
    after_kill: dict[str, list[str]] = field(default_factory=dict)  # point -> problems right after it
    killed: dict[str, str] = field(default_factory=dict)  # point -> dvc's output tail
    final_output: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


def selected_kills(session: pytest.Session) -> list[Kill]:
    """The kills whose tests this session runs (all of KILLS, or the sample a ``-k`` expression picks), in
    pipeline order: the chain of kills runs only those (all when only the end-of-chain checks are picked)."""
    chosen = {
        item.callspec.params["kill"]
        for item in session.items
        if hasattr(item, "callspec") and "kill" in item.callspec.params
    }
    return [kill for kill in KILLS if kill in chosen] or list(KILLS)  # none chosen: the end checks run


def delete_outputs(clone: Path, outputs: list[str]) -> None:
    """The committed results (the default profile's) deleted, so that every output the tests see was
    written by the tiny run. Validate's are kept: its inputs are the full raw splits, the same here, so
    its committed lock entry holds and DVC skips it (the kill of validate deletes its metrics first)."""
    for relative in outputs:
        if relative not in ("metrics/validation.json", DATA_DOCS):
            path = clone / relative
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def kill_run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> KillRun:
    mirror = mirror_dir()
    if mirror is None:
        pytest.skip("the CIFAR-10 mirror is not available (download.mirror_dir in conf/config.yaml)")
    kills = selected_kills(request.session)
    root = tmp_path_factory.mktemp("faults")
    baseline, clone = make_clone(root / "baseline", mirror), make_clone(root / "killed", mirror)
    run = KillRun(baseline, clone, declared_outputs(baseline))
    for project in (baseline, clone):
        delete_outputs(project, run.outputs)
    started = time.monotonic()
    done = dvc_repro(baseline, env_for(baseline))
    assert done.returncode == 0, done.stdout[-4000:]
    run.seconds["baseline"] = time.monotonic() - started
    for kill in kills:
        for relative in kill.prepare:
            (clone / relative).unlink()
        started = time.monotonic()
        env = env_for(clone, CIFAR10_TEST_FAULT=f"{kill.stage}:{kill.point}")
        env["PYTHONPATH"] = f"{INJECTION}{os.pathsep}{env['PYTHONPATH']}"
        done = dvc_repro(clone, env)
        run.seconds[kill.point] = time.monotonic() - started
        run.killed[kill.point] = done.stdout[-2500:]
        assert f"Running stage '{kill.stage}'" in done.stdout, done.stdout[-3000:]
        assert done.returncode == (-signal.SIGKILL if kill.group else 255), done.stdout[-3000:]
        run.after_kill[kill.point] = differences(baseline, clone, run.outputs)
    started = time.monotonic()
    done = dvc_repro(clone, env_for(clone))
    run.seconds["final repro"] = time.monotonic() - started
    run.final_output = done.stdout
    assert done.returncode == 0, done.stdout[-4000:]
    print(f"kill-and-repro timings (s): { {k: round(v, 1) for k, v in run.seconds.items()} }")
    return run


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kill" in metafunc.fixturenames:
        metafunc.parametrize(
            "kill",
            [
                pytest.param(
                    kill,
                    id=f"{kill.stage}-{kill.point}",
                    marks=pytest.mark.reliability(
                        kill.case,
                        "no output looked complete but was not; the next dvc repro finished it",
                    ),
                )
                for kill in KILLS
            ],
        )


@pytest.mark.slow
def test_a_killed_stage_leaves_no_output_that_looks_complete(kill_run: KillRun, kill: Kill) -> None:
    assert "SIGKILL" in kill_run.killed[kill.point] or kill.stage in kill_run.killed[kill.point]
    assert kill_run.after_kill[kill.point] == [], (
        f"after {kill.case}: {kill_run.after_kill[kill.point]}\n{kill_run.killed[kill.point]}"
    )


@pytest.mark.slow
@pytest.mark.reliability(
    "`dvc repro` again after every kill",
    "every DVC-tracked output equals an uninterrupted run's (byte for byte, measured values aside)",
)
def test_repro_after_the_kills_equals_an_uninterrupted_run(kill_run: KillRun) -> None:
    baseline, clone = kill_run.baseline, kill_run.clone
    for relative in kill_run.outputs:
        assert (clone / relative).exists(), relative
    assert differences(baseline, clone, kill_run.outputs) == []
    byte_identical = [p for p in kill_run.outputs if p not in MEASURED]
    for relative in byte_identical:
        assert comparable(baseline, relative) == comparable(clone, relative), relative
    # No scratch folder of a killed write survives a successful run, and DVC sees nothing to do.
    leftovers = [p for p in clone.rglob("*.partial") if ".dvc" not in p.parts and ".git" not in p.parts]
    assert leftovers == []
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=clone,
        env=env_for(clone),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert json.loads(status.stdout) == {}


@pytest.mark.slow
@pytest.mark.reliability(
    "stages SIGKILLed (MLflow runs cannot close themselves)",
    "the next stage on the machine marks their runs KILLED: none is left RUNNING",
)
def test_no_mlflow_run_is_left_running_after_the_kills(kill_run: KillRun) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{kill_run.clone / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cifar10").experiment_id], max_results=1000)
    by_status: dict[str, int] = {}
    for run in runs:
        by_status[run.info.status] = by_status.get(run.info.status, 0) + 1
    assert "RUNNING" not in by_status, by_status
    assert by_status.get("KILLED", 0) >= 1


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
    from ..helpers import write_params

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
def test_two_dvc_repro_at_once(tmp_path_factory: pytest.TempPathFactory) -> None:
    mirror = mirror_dir()
    if mirror is None:
        pytest.skip("the CIFAR-10 mirror is not available")
    clone = make_clone(tmp_path_factory.mktemp("twice") / "clone", mirror)
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
