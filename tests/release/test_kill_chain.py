"""The release check of the fault suite: every kill of ``KILLS`` in turn in one checkout (``make
test-release``; CI runs it after ``make test``, whose tests/integration/test_faults.py kills each point in a
fresh copy of one prepared checkout).

Two clones of the project run the tiny real run on the small mirror: one uninterrupted (the baseline), one
killed at every point in turn (each ``dvc repro`` re-runs the stage killed before and runs on to the next
kill) and finished by a last ``dvc repro``. After every kill, each declared output is either absent or
complete (equal to the baseline's); at the end every output equals the baseline's, byte for byte except the
measured ones, and no MLflow run is left RUNNING. What this adds to the per-kill cases: the kills pile up
in one checkout, so a later stage meets whatever an earlier kill left. The chain runs only the kills whose
tests the session selected, so ``-k "download or safetensors"`` runs a sample.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..support.faults import (
    INJECTION,
    KILLS,
    MEASURED,
    Kill,
    comparable,
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


@pytest.fixture(scope="module")
def kill_run(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, small_mirror: Path
) -> KillRun:
    mirror = small_mirror
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
            (clone / relative).unlink(missing_ok=True)
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
    assert scratch_leftovers(clone) == []
    assert dvc_status(clone) == {}


@pytest.mark.slow
@pytest.mark.reliability(
    "stages SIGKILLed (MLflow runs cannot close themselves)",
    "the next stage on the machine marks their runs KILLED: none is left RUNNING",
)
def test_no_mlflow_run_is_left_running_after_the_kills(kill_run: KillRun) -> None:
    by_status = mlflow_statuses(kill_run.clone)
    assert "RUNNING" not in by_status, by_status
    assert by_status.get("KILLED", 0) >= 1
