"""The train stage as DVC runs it, in real subprocesses: `train.nproc: 2` starts itself under torchrun (2 CPU
processes, gloo). A SIGKILLed stage with checkpoints resuming to the uninterrupted run's exact model is
tests/release/test_train_resume.py (`make test-release`); tests/model/test_checkpoint.py checks the same
resume in-process, which `make test` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cifar10_pipeline.core.paths import MODEL_DIR, STAGE_EMISSIONS_DIR, TRAIN_METRICS
from cifar10_pipeline.modeling.model import load_model

from ..support.helpers import save_tiny_vit_checkpoint, write_params
from .test_train_stage import TINY_TRAIN, stage_runs, write_processed

pytestmark = pytest.mark.slow
STAGE = [sys.executable, "-m", "cifar10_pipeline.stages.train"]


def run_stage(root: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(STAGE, cwd=root, capture_output=True, text=True, timeout=timeout, env=os.environ)


def test_two_cpu_processes_train_one_model_and_log_one_run(project: Path) -> None:
    write_processed(project, train_size=400, val_size=100)
    write_params(project, train={**TINY_TRAIN, "nproc": 2})
    done = run_stage(project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "starting 2 processes with torchrun" in done.stdout
    two = json.loads((project / TRAIN_METRICS).read_text())
    assert two["processes"] == 2
    assert two["train_images_per_second"] > 0 and two["steps"] == 3 * (400 // 50)
    load_model(project / MODEL_DIR)  # rank 0 saved a loadable model
    assert (project / STAGE_EMISSIONS_DIR / "train.json").is_file()
    runs = stage_runs(project)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 1 opened no MLflow run

    write_params(project, train={**TINY_TRAIN, "nproc": 1})
    done = run_stage(project)
    assert done.returncode == 0, done.stdout + done.stderr
    one = json.loads((project / TRAIN_METRICS).read_text())
    assert one["processes"] == 1
    # Same global batch, same order, same augmentation; only batch norm sees half batches per process.
    assert abs(two["val_accuracy"] - one["val_accuracy"]) <= 0.05, (two["val_accuracy"], one["val_accuracy"])
    assert one["val_accuracy"] >= 0.3  # well above chance (0.1) after 3 short epochs


def test_a_batch_that_does_not_split_between_processes_is_refused(project: Path) -> None:
    write_processed(project, train_size=200, val_size=50)
    write_params(project, train={**TINY_TRAIN, "nproc": 2, "batch_size": 51})
    done = run_stage(project)
    assert done.returncode != 0
    assert "train.batch_size (51) is the global batch and must divide evenly" in done.stdout + done.stderr
    assert not (project / MODEL_DIR).exists()


def test_a_hub_checkpoint_fine_tunes_on_two_processes(project: Path, tmp_path: Path) -> None:
    """The transformers path (AdamW on the mean loss) under DDP: a tiny ViT checkpoint stands in for
    google/vit-base-patch16-224-in21k, whose weights cannot be downloaded here."""
    checkpoint = save_tiny_vit_checkpoint(tmp_path / "tiny-vit")  # 5 labels of its own: re-headed to 10
    write_processed(project, train_size=200, val_size=50)  # a validation split: calibrated on rank 0
    hp = {**TINY_TRAIN, "model": str(checkpoint), "finetune_image_size": 32, "nproc": 2, "epochs": 1}
    write_params(project, train=hp)
    done = run_stage(project)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((project / TRAIN_METRICS).read_text())
    assert summary["processes"] == 2 and summary["architecture"] == "ViTForImageClassification"
    assert type(load_model(project / MODEL_DIR)).__name__ == "ViTForImageClassification"
    assert len(stage_runs(project)) == 1
    assert summary["temperature"] is not None
