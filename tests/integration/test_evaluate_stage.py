"""The evaluate stage's main(): it registers the model in MLflow (real SQLite stores), but its DVC outputs
hold no registry fact and are the same on a fresh store and on one with a history; the temperature it
applies is the one saved with the model, never one fitted on the test split."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from cifar10_pipeline.core.data import ArraySplit, save_split
from cifar10_pipeline.core.params import load_params
from cifar10_pipeline.core.paths import EVAL_METRICS, MODEL_DIR, PROCESSED_DIR, STAGE_EMISSIONS_DIR
from cifar10_pipeline.modeling.inference import set_calibration_temperature
from cifar10_pipeline.stages import evaluate as evaluate_stage

from ..conftest import PROJECT_ROOT, synthetic_images
from ..support.helpers import fresh_and_history_stores, tiny_convnet, write_params

SMALL_EVALUATE = {"batch_size": 40, "robustness_images": 20, "gallery_per_class": 1}
# What registry.log_and_register answers; it depends on the store's history.
REGISTRY_KEYS = {"registered_model", "version", "champion_version", "promoted", "previous_champion_accuracy"}
TIMING = ("seconds", "images_per_second")  # measured, so they differ between any two runs


def without_measurements(path: str, content: bytes) -> object:
    """An output with what is measured afresh on every run (time, energy) left out."""
    if path == EVAL_METRICS.as_posix():
        metrics = json.loads(content)
        return metrics | {"inference": {k: v for k, v in metrics["inference"].items() if k not in TIMING}}
    if path.startswith(STAGE_EMISSIONS_DIR.as_posix()):
        return {k: v for k, v in json.loads(content).items() if not isinstance(v, float)}
    return content


def declared_outputs() -> list[Path]:
    """The evaluate stage's outs, metrics and plots as dvc.yaml declares them."""
    stage = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    entries = [e for kind in ("outs", "metrics", "plots") for e in stage.get(kind, [])]
    return [Path(e if isinstance(e, str) else next(iter(e))) for e in entries]


def files_under(root: Path, paths: list[Path]) -> dict[str, bytes]:
    found = {}
    for path in paths:
        for file in [root / path] if (root / path).is_file() else sorted((root / path).rglob("*")):
            if file.is_file():
                found[file.relative_to(root).as_posix()] = file.read_bytes()
    return found


@pytest.fixture
def evaluated_project(project: Path) -> Path:
    """Params, a processed test split and a saved tiny model: the evaluate stage's deps."""
    write_params(project, evaluate=SMALL_EVALUATE)
    images, labels = synthetic_images(60, seed=3)
    (project / PROCESSED_DIR).mkdir(parents=True)
    save_split(project / PROCESSED_DIR / "test.npz", ArraySplit(images, labels, np.arange(len(labels))))
    tiny_convnet(tta_level=1).save_pretrained(project / MODEL_DIR)
    return project


@pytest.mark.slow  # two evaluate runs and four registrations: ~50 s on 2 cores
def test_outputs_hold_no_registry_fact_whatever_the_mlflow_history(
    evaluated_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    project, declared = evaluated_project, declared_outputs()
    outputs, versions = [], []
    for _ in fresh_and_history_stores(tmp_path, monkeypatch):
        before = {p for p in project.rglob("*") if p.is_file()}
        evaluate_stage.main()
        written = {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()} - {
            p.relative_to(project).as_posix() for p in before
        }
        produced = files_under(project, declared)
        # Every file it wrote is a declared output, or MLflow's local artifact store (not tracked by DVC).
        assert {w for w in written if not w.startswith("mlruns/")} <= set(produced)
        outputs.append(produced)
        client = MlflowClient()
        latest = max(int(v.version) for v in client.search_model_versions("name='cifar10-classifier'"))
        versions.append(latest)
    assert versions == [1, 4]  # MLflow still registers: a different version on each store
    assert not (project / "metrics/registry.json").exists()

    fresh, history = outputs
    assert set(fresh) == set(history) and set(fresh) >= {p.as_posix() for p in declared if p.suffix}
    for path in fresh:
        first, second = without_measurements(path, fresh[path]), without_measurements(path, history[path])
        assert first == second, f"{path} differs between the two MLflow histories"
        if path.endswith((".json", ".csv")):
            text = fresh[path].decode()
            assert "champion" not in text and "cifar10-classifier" not in text, path
            assert not set(re.findall(r'"(\w+)":', text)) & REGISTRY_KEYS, path
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    tagged = client.search_runs(experiments, filter_string="tags.`registry.version` = '4'")
    assert tagged, "the registry's answer stays in MLflow, as run tags"


@pytest.mark.parametrize("saved", [None, 0.5])
def test_the_temperature_is_the_saved_one_never_fitted_on_test(evaluated_project: Path, saved) -> None:
    model = tiny_convnet(tta_level=0)
    if saved is not None:
        set_calibration_temperature(model, saved)  # what train.calibrate stores after fitting on validation
    model.save_pretrained(evaluated_project / MODEL_DIR)
    metrics = evaluate_stage.evaluate(load_params().evaluate).metrics
    assert metrics["temperature"] == (saved or 1.0)
    if saved is None:  # no validation split: nothing was fitted, nothing is applied
        assert metrics["ece"] == metrics["ece_before_temperature"]
    else:
        assert metrics["ece"] != metrics["ece_before_temperature"]
