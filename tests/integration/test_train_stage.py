"""The train stage's main() with a real MLflow store (SQLite) and codecarbon: every epoch reaches MLflow,
and a failure marks the runs FAILED and leaves no outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cifar10_pipeline.core.paths import MODEL_DIR, STAGE_EMISSIONS_DIR, TRAIN_HISTORY, TRAIN_METRICS
from cifar10_pipeline.modeling.inference import resolve_precision
from cifar10_pipeline.stages import train as train_stage

from ..conftest import synthetic_images
from ..support.helpers import write_params, write_train_val

TINY_TRAIN = {"widths": [8, 16, 16], "epochs": 3, "batch_size": 50, "device": "cpu", "tta_level": 0}


def write_processed(root: Path, train_size: int, val_size: int, bad_label: bool = False) -> None:
    images, labels = synthetic_images(train_size + val_size, seed=5)
    if bad_label:
        labels[7] = 10  # one label outside the 10 classes
    write_train_val(root / "data" / "processed", images, labels, train_size)


def stage_runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    return [r for r in runs if r.data.tags.get("stage") == "train"]


def test_every_epoch_reaches_mlflow_without_a_validation_split(
    project: Path, capsys: pytest.CaptureFixture
) -> None:
    # The GPU profiles hold no validation split (val_size 0): the stage must still finish and say so.
    write_params(project, train=TINY_TRAIN)
    write_processed(project, train_size=200, val_size=0)
    train_stage.main()
    summary = json.loads((project / TRAIN_METRICS).read_text())

    assert summary["val_accuracy"] is None
    assert "no validation split" in capsys.readouterr().out
    # Nothing to fit a temperature on: none is recorded and the saved model applies none.
    assert summary["temperature"] is None
    assert json.loads((project / MODEL_DIR / "config.json").read_text())["calibration_temperature"] == 1.0
    # precision: auto is bf16 autocast (batch norm on fp32 copies) on a CPU with native bf16, else fp32.
    assert summary["precision"] == resolve_precision("auto", torch.device("cpu"))
    assert summary["batchnorm_precision"] == {"bf16": "fp32 copy", "fp32": "fp32"}[summary["precision"]]
    (run,) = stage_runs(project)
    assert run.info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    learning_rates = client.get_metric_history(run.info.run_id, "lr")  # logged per epoch only
    assert sorted(m.step for m in learning_rates) == [1, 2, 3]
    assert (project / TRAIN_METRICS).is_file() and (project / MODEL_DIR / "config.json").is_file()
    assert (project / STAGE_EMISSIONS_DIR / "train.json").is_file()


def test_a_failed_training_marks_the_run_failed_and_leaves_no_outputs(project: Path) -> None:
    write_params(project, train=TINY_TRAIN)
    write_processed(project, train_size=200, val_size=50, bad_label=True)
    with pytest.raises((IndexError, RuntimeError)):
        train_stage.main()

    (run,) = stage_runs(project)
    assert run.info.status == "FAILED"
    for output in (TRAIN_METRICS, TRAIN_HISTORY, MODEL_DIR, STAGE_EMISSIONS_DIR / "train.json"):
        assert not (project / output).exists(), f"{output} left behind by a failed training"
