"""The champion alias moves only to a model that beats the current champion on the same test set.

Runs against a real MLflow SQLite store and registry, and against a real ``mlflow server`` killed before the
evaluate stage registers its model: the stage registers in the local store instead of failing.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from cifar10_pipeline.core.data import ArraySplit
from cifar10_pipeline.core.params import load_params
from cifar10_pipeline.stages import evaluate
from cifar10_pipeline.tracking import model_registry as registry
from cifar10_pipeline.tracking.runs import RESUMES_TAG, stage_run

from ..conftest import synthetic_images
from ..support.helpers import save_tiny_convnet
from ..support.localserver import mlflow_server

NAME = "cifar10-test-classifier"


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment_id = client.create_experiment("registry-test", artifact_location=(tmp_path / "art").as_uri())
    return client, experiment_id


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_convnet(tmp_path_factory.mktemp("model") / "cifar10")


def register(
    client, experiment_id: str, model_dir: Path, accuracy: float, test_set: str, champion_eval=None
) -> dict:
    images, _ = synthetic_images(4, seed=0)
    run = client.create_run(experiment_id)
    calls = []

    def evaluate_champion(uri: str) -> float:
        calls.append(uri)
        assert champion_eval is not None, "the champion should not need re-evaluation here"
        return champion_eval

    outcome = registry.log_and_register(
        run.info.run_id,
        model_dir,
        NAME,
        example_images=images,
        example_probabilities=np.full((4, 10), 0.1),
        accuracy=accuracy,
        test_set=test_set,
        evaluate_champion=evaluate_champion,
    )
    outcome["reevaluated"] = calls
    return outcome


def champion_version(client) -> str:
    return str(client.get_model_version_by_alias(NAME, registry.CHAMPION).version)


def test_champion_alias_rule(mlflow_store, model_dir: Path) -> None:
    client, experiment_id = mlflow_store
    first = register(client, experiment_id, model_dir, accuracy=0.80, test_set="A")
    assert first["promoted"] and champion_version(client) == first["version"] == "1"

    worse = register(client, experiment_id, model_dir, accuracy=0.79, test_set="A")
    assert not worse["promoted"] and champion_version(client) == "1"
    assert worse["previous_champion_accuracy"] == pytest.approx(0.80)

    tie = register(client, experiment_id, model_dir, accuracy=0.80, test_set="A")
    assert not tie["promoted"] and champion_version(client) == "1"  # must *beat* the champion

    better = register(client, experiment_id, model_dir, accuracy=0.81, test_set="A")
    assert better["promoted"] and champion_version(client) == better["version"] == "4"
    version = client.get_model_version(NAME, "4")
    assert version.tags[registry.ACCURACY_TAG] == "0.810000"
    assert version.tags[registry.TEST_SET_TAG] == "A"


def test_other_test_set_re_evaluates_the_champion(mlflow_store, model_dir: Path) -> None:
    client, experiment_id = mlflow_store
    register(client, experiment_id, model_dir, accuracy=0.95, test_set="subset")
    # On the new test set the champion scores 0.70, so 0.75 wins even though 0.75 < 0.95.
    challenger = register(
        client, experiment_id, model_dir, accuracy=0.75, test_set="full", champion_eval=0.70
    )
    assert challenger["reevaluated"] == [f"models:/{NAME}/1"]
    assert challenger["promoted"] and champion_version(client) == "2"


def test_registered_model_predicts_probabilities(mlflow_store, model_dir: Path) -> None:
    import mlflow

    client, experiment_id = mlflow_store
    register(client, experiment_id, model_dir, accuracy=0.5, test_set="A")
    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@{registry.CHAMPION}")
    images, _ = synthetic_images(3, seed=1)
    probabilities = loaded.predict(images)
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
    assert loaded.metadata.signature is not None


def test_fingerprint_names_the_exact_test_set() -> None:
    images, labels = synthetic_images(10, seed=0)
    fingerprint = registry.test_set_fingerprint(images, labels)
    assert fingerprint == registry.test_set_fingerprint(images.copy(), labels.copy())
    labels[0] = (labels[0] + 1) % 10
    assert fingerprint != registry.test_set_fingerprint(images, labels)


def test_a_server_lost_before_registration_registers_in_the_local_store(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The evaluate stage's registration, the server SIGKILLed (with its worker) after the stage's run
    opened: the stage moves to the local store, registers there, and ends FINISHED."""
    from mlflow.tracking import MlflowClient

    save_tiny_convnet(project / evaluate.MODEL_DIR)
    images, labels = synthetic_images(8, seed=0)
    evaluation = evaluate.Evaluation(
        metrics={"accuracy": 0.5},
        test=ArraySplit(images, labels, np.arange(len(labels))),
        probabilities=np.full((len(labels), 10), 0.1),
        confusion=np.zeros((10, 10), dtype=np.int64),
        reliability_bins=[],
        mistakes=None,
    )
    server_store = f"sqlite:///{project.parent / 'server.db'}"
    with mlflow_server(server_store, project.parent, project.parent / "server.log") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        with stage_run("evaluate", load_params()) as run:
            server_run = run.run_id
            os.killpg(url.pid, signal.SIGKILL)
            outcome = evaluate.register(run, evaluation, NAME)
    out = capsys.readouterr().out
    assert "stopped answering mid-stage" in out, out
    assert "copy the runs to it with" in out, out
    assert outcome["version"] == outcome["champion_version"] == "1" and outcome["promoted"], outcome
    local = MlflowClient(
        tracking_uri=f"sqlite:///{project / 'mlflow.db'}", registry_uri=f"sqlite:///{project / 'mlflow.db'}"
    )
    version = local.get_model_version_by_alias(NAME, registry.CHAMPION)
    child = local.get_run(version.run_id)
    assert child.info.status == "FINISHED" and child.data.tags[RESUMES_TAG] == server_run
    assert child.data.tags["registry.version"] == "1"
