"""The release form of the train stage's crash-resume: the stage as DVC runs it (a subprocess), SIGKILLed
once its first checkpoint is on disk, then run again, ends with the uninterrupted run's exact model.
`make test` checks the same resume in-process (tests/model/test_checkpoint.py); this adds the real kill of
a real stage process, at three stage runs' cost (about 100 s on 2 cores)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cifar10_pipeline.core.paths import MODEL_DIR, TRAIN_CHECKPOINT_DIR

from ..integration.test_distributed import STAGE, run_stage
from ..integration.test_train_stage import TINY_TRAIN, write_processed
from ..support.helpers import write_params

pytestmark = pytest.mark.slow


@pytest.mark.reliability(
    "train stage SIGKILLed mid-run (checkpoint_every: 1), then run again",
    "resumes from the last checkpoint; the saved model is byte-identical to an uninterrupted run's",
)
def test_a_killed_run_resumes_to_the_same_model(project: Path, tmp_path: Path) -> None:
    write_processed(project, train_size=400, val_size=100)
    write_params(project, train={**TINY_TRAIN, "epochs": 8, "checkpoint_every": 1})
    assert run_stage(project).returncode == 0
    reference = {p.name: p.read_bytes() for p in (project / MODEL_DIR).iterdir()}
    assert not (project / TRAIN_CHECKPOINT_DIR / "last.pt").exists()  # deleted once the model is saved
    for path in (project / MODEL_DIR).iterdir():
        path.unlink()
    (project / MODEL_DIR).rmdir()

    process = subprocess.Popen(STAGE, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = project / TRAIN_CHECKPOINT_DIR / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), "no checkpoint appeared"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (project / MODEL_DIR).exists()  # no model that looks complete

    done = run_stage(project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming from" in done.stdout
    resumed = {p.name: p.read_bytes() for p in (project / MODEL_DIR).iterdir()}
    assert resumed.keys() == reference.keys()
    for name, content in reference.items():
        assert resumed[name] == content, name
