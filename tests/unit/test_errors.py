"""Stage entries print a user's error as a message with a hint, exit 1, and show the traceback only with
--debug (core/errors.py: run_cli, used by every ``python -m cifar10_pipeline.stages.X``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cifar10_pipeline.core.data import ArraySplit, DataError, save_split
from cifar10_pipeline.core.errors import run_cli
from cifar10_pipeline.core.params import ParamsError
from cifar10_pipeline.core.paths import MODEL_DIR, PROCESSED_DIR

from ..conftest import PROJECT_ROOT
from ..support.helpers import write_params


def _fails(error: Exception):
    def main() -> None:
        raise error

    return main


def test_a_pipeline_error_is_a_message_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_cli(_fails(DataError("data/raw/SHA256SUMS is missing", hint="run dvc repro download")), argv=[])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: data/raw/SHA256SUMS is missing"
    assert err[1] == "hint: run dvc repro download"
    assert err[2].startswith("(for the full traceback, run: ") and err[2].endswith(" --debug)")


def test_debug_shows_the_traceback() -> None:
    with pytest.raises(ParamsError, match="bad key"):
        run_cli(_fails(ParamsError("bad key")), argv=["--debug"])


def test_other_exceptions_keep_their_traceback() -> None:
    # Not a user's error but a bug: Python's own report, untouched.
    with pytest.raises(ZeroDivisionError):
        run_cli(_fails(ZeroDivisionError("division by zero")), argv=[])


def test_success_exits_0_and_unknown_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: None, argv=[])
    assert exit_.value.code == 0
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: None, argv=["--verbose"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --verbose" in capsys.readouterr().err


@pytest.mark.slow  # two stage processes, about 4 s each
@pytest.mark.reliability(
    "a params error when a stage runs (preprocess.max_test_images: 5 in params.yaml)",
    "the stage prints 'error: params.yaml is invalid:' with the key, and a hint, exits 1 before any work, "
    "and shows no traceback unless --debug is given",
)
def test_stage_params_error_is_a_message(tmp_path: Path) -> None:
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["preprocess"]["max_test_images"] = 5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [sys.executable, "-m", "cifar10_pipeline.stages.preprocess"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: params.yaml is invalid:",
        "  the test split would keep 5 images (preprocess.max_test_images: 5, of 10000); it needs at least "
        "100 (10 per class): raise preprocess.max_test_images or set it to null (the whole split)",
        "hint: fix the key(s) above; every key is documented in conf/config.yaml",
        "(for the full traceback, run: python -m cifar10_pipeline.stages.preprocess --debug)",
    ]
    assert not (tmp_path / "mlflow.db").exists()  # refused before the stage opened its run
    debug = subprocess.run(
        [*command, "--debug"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


# Training settings a user can get wrong, each refused by the train stage before torchrun or MLflow start.
TRAIN_SETTING_ERRORS = {
    "muon on a transformer": (
        {"model": "cifar_vit", "filter_optimizer": "muon"},
        "error: train.filter_optimizer: muon is part of the cifar_convnet recipe; train.model 'cifar_vit' "
        "trains with adamw",
        "hint: set train.filter_optimizer: sgd (or train.model: cifar_convnet)",
    ),
    "cuda asked, none visible": (
        {"device": "cuda"},
        "error: train.device is 'cuda' but no CUDA GPU is visible to torch ",
        "hint: set train.device: auto (or cpu), or check CUDA_VISIBLE_DEVICES and the driver (nvidia-smi)",
    ),
    "batch not divisible by the processes": (
        {"nproc": 2, "batch_size": 51},
        "error: train.batch_size (51) is the global batch and must divide evenly between the 2 processes",
        "hint: set train.batch_size to a multiple of 2, or change train.nproc",
    ),
}


@pytest.mark.slow  # one train stage process each, about 5 s
@pytest.mark.parametrize("case", TRAIN_SETTING_ERRORS)
def test_train_setting_errors_are_a_message(case: str, tmp_path: Path) -> None:
    train, error, hint = TRAIN_SETTING_ERRORS[case]
    write_params(tmp_path, train=train)
    # No GPU for torch whatever the machine: the cuda case needs none, the others must not depend on one.
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "cifar10_pipeline.stages.train"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith(("error:", "hint:"))] == lines[:2], lines
    assert lines[0].startswith(error) and lines[1] == hint
    assert "torchrun" not in result.stdout  # refused before starting any process
    assert not (tmp_path / "mlflow.db").exists()  # and before the stage opened its run


@pytest.mark.slow  # one evaluate stage process, about 10 s
def test_evaluate_before_any_training_is_a_message(tmp_path: Path) -> None:
    """The evaluate stage run on a checkout with processed data but no trained model says how to get one."""
    write_params(tmp_path)
    (tmp_path / PROCESSED_DIR).mkdir(parents=True)
    images = np.zeros((20, 32, 32, 3), dtype=np.uint8)
    test = ArraySplit(images, np.arange(20, dtype=np.int64) % 10, np.arange(20, dtype=np.int64))
    save_split(tmp_path / PROCESSED_DIR / "test.npz", test)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "cifar10_pipeline.stages.evaluate"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"error: no trained model at {MODEL_DIR}: train one with the quick profile")
