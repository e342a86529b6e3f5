"""tracking.runs.stage_run, the harness every stage's main() opens, against a real MLflow store (SQLite in
tmp_path): a stage run and its parent end FINISHED, FAILED or KILLED, never RUNNING, and a failed stage
leaves none of its declared outputs behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifar10_pipeline.core.io import write_json_atomic
from cifar10_pipeline.core.params import load_params
from cifar10_pipeline.tracking.runs import stage_run

OUT_FILE = Path("metrics/out.json")
OUT_DIR = Path("reports/out")


def runs_of(stage: str) -> tuple[object, object]:
    """(the stage's only child run, its parent) in the store MLFLOW_TRACKING_URI names."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    (child,) = client.search_runs(experiments, filter_string=f"tags.stage = '{stage}'")
    return child, client.get_run(child.data.tags["mlflow.parentRunId"])


def write_outputs() -> None:
    write_json_atomic(OUT_FILE, {"accuracy": 0.5})
    (OUT_DIR).mkdir(parents=True)
    (OUT_DIR / "figure.png").write_bytes(b"png")


def test_a_stage_that_succeeds_finishes_with_params_metrics_and_outputs(project: Path) -> None:
    params = load_params()
    with stage_run("demo", params, outputs=(OUT_FILE, OUT_DIR)) as run:
        write_outputs()
        run.log_metrics({"accuracy": 0.5}, to_parent=True)
        for epoch, loss in enumerate((3.0, 2.5, 2.0), start=1):
            run.log_metrics({"loss": loss}, step=epoch)
        run.set_tags({"device": "cpu"})
        run.log_artifact(OUT_FILE)

    child, parent = runs_of("demo")
    assert (child.info.status, parent.info.status) == ("FINISHED", "FINISHED")
    for run in (child, parent):  # the effective params, flattened, on both
        assert run.data.params["train.epochs"] == str(params.train.epochs)
        assert run.data.params["profile"] == params.profile
        assert run.data.metrics["accuracy"] == 0.5
    assert child.data.metrics["loss"] == 2.0 and "loss" not in parent.data.metrics
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(child.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert child.data.tags["device"] == "cpu" and child.data.tags["pipeline.role"] == "stage"
    assert parent.data.tags["pipeline.role"] == "pipeline"
    assert (project / OUT_FILE).is_file() and (project / OUT_DIR / "figure.png").is_file()


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RuntimeError("the stage broke"), "FAILED"),
        (SystemExit("validate: FAILED (1 expectation(s))"), "FAILED"),  # how validate's main() fails
        (KeyboardInterrupt(), "KILLED"),
    ],
    ids=["exception", "system-exit", "ctrl-c"],
)
def test_a_stage_that_raises_ends_its_runs_and_leaves_no_outputs(
    project: Path, error: BaseException, status: str
) -> None:
    write_json_atomic(OUT_FILE, {"accuracy": 0.9})  # a stale output of an earlier run
    with pytest.raises(type(error)), stage_run("demo", load_params(), outputs=(OUT_FILE, OUT_DIR)) as run:
        write_outputs()
        run.log_metrics({"accuracy": 0.5})
        raise error

    child, parent = runs_of("demo")
    assert (child.info.status, parent.info.status) == (status, status)
    assert child.data.metrics["accuracy"] == 0.5  # what was logged before the failure stays
    assert not (project / OUT_FILE).exists() and not (project / OUT_DIR).exists()


def test_sigterm_closes_the_run_killed(project: Path) -> None:
    """A real process stopped with SIGTERM (as `dvc queue kill` or `docker stop` do) mid-stage."""
    ready = project / "ready"
    script = f"""
import time
from pathlib import Path
from cifar10_pipeline.core.io import write_json_atomic
from cifar10_pipeline.core.params import load_params
from cifar10_pipeline.tracking.runs import stage_run

with stage_run("demo", load_params(), outputs=(Path("{OUT_FILE}"),)):
    write_json_atomic(Path("{OUT_FILE}"), {{}})
    Path("{ready}").touch()
    time.sleep(120)
"""
    process = subprocess.Popen([sys.executable, "-c", script], cwd=project, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None, f"the stage process ended early:\n{process.stderr.read()}"
            assert time.monotonic() < deadline, "the stage process never reached its work"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert returncode == 128 + signal.SIGTERM
    child, parent = runs_of("demo")
    assert (child.info.status, parent.info.status) == ("KILLED", "KILLED")
    assert not (project / OUT_FILE).exists()


def test_the_sigterm_handler_is_restored(project: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stage_run("demo", load_params()):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
