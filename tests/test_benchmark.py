"""The training benchmark: real (tiny) training runs per seed, the JSON entry issue 7 asks for, the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cifar10_pipeline import benchmark
from cifar10_pipeline.data import ArraySplit, save_split

from .conftest import PROJECT_ROOT, synthetic_images

REQUIRED = {
    "device",
    "torch",
    "seeds",
    "accuracy_mean",
    "accuracy_std",
    "train_seconds",
    "train_seconds_median",
    "warmup_seconds",
    "stage_wall_seconds",
    "epochs",
}


@pytest.fixture
def processed(tmp_path: Path) -> Path:
    for name, n, seed in (("train", 400, 1), ("val", 20, 2), ("test", 100, 3)):
        images, labels = synthetic_images(n, seed)
        save_split(tmp_path / f"{name}.npz", ArraySplit(images, labels, np.arange(n)))
    return tmp_path


def tiny_params(model: str = "cifar_convnet"):
    overrides = [
        f"train.model={model}",
        "train.device=cpu",
        "train.widths=[8,16,16]",
        "train.batch_size=50",
        "train.epochs=1",
        "train.vit_dim=16",
        "train.vit_depth=1",
        "train.vit_heads=2",
    ]
    return benchmark.load_profile("quick", overrides, params_file=PROJECT_ROOT / "params.yaml")


@pytest.mark.parametrize("model", ["cifar_convnet", "cifar_vit"])
def test_each_seed_is_a_real_run_and_saved_as_it_ends(processed: Path, model: str) -> None:
    partials = []
    entry = benchmark.benchmark_training(tiny_params(model), 2, processed, on_seed=partials.append)
    assert set(entry) >= REQUIRED
    assert [p["seeds"] for p in partials] == [1, 2]
    assert entry["seeds"] == 2 and len(entry["train_seconds"]) == 2 and entry["model"] == model
    assert all(0.0 <= a <= 1.0 for a in entry["accuracies"]) and entry["train_seconds_median"] > 0
    # The epochs' loop is part of the timed run, not all of it (evaluation and setup are timed too).
    assert all(
        0 < loop < total for loop, total in zip(entry["loop_seconds"], entry["train_seconds"], strict=True)
    )
    assert entry["stage_wall_seconds"] > entry["train_seconds"][0]
    if model == "cifar_vit":
        assert entry["forward_macs_per_image"]["transformer"] > 0


def test_save_merges_entries_and_renders_them(tmp_path: Path, processed: Path) -> None:
    metrics, report = tmp_path / "benchmark.json", tmp_path / "benchmark.md"
    entry = benchmark.benchmark_training(tiny_params(), 1, processed)
    benchmark.save("first", entry, metrics, report)
    benchmark.save("second", {**entry, "note": "a second run"}, metrics, report)
    assert set(json.loads(metrics.read_text())) == {"first", "second"}
    text = report.read_text()
    assert "| first | cifar_convnet |" in text and "| second |" in text and "a second run" in text


def test_refuses_zero_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        benchmark.main(["--seeds", "0"])
    assert "--seeds must be at least 1" in capsys.readouterr().err
