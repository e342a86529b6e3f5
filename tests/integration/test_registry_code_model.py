"""The registered pyfunc is logged as code (MLflow models-from-code), not pickled: loading it runs
tracking/pyfunc_model.py, and it predicts what the saved model predicts. Real MLflow SQLite store."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from cifar10_pipeline.modeling.inference import predict_logits
from cifar10_pipeline.modeling.model import load_model
from cifar10_pipeline.tracking import model_registry as registry

from ..conftest import synthetic_images
from ..support.helpers import save_tiny_convnet

NAME = "cifar10-code-model"


@pytest.mark.slow  # logs, registers and loads a model: about 15 s on 2 cores
@pytest.mark.reliability(
    "loading the registered MLflow model (which used to be a CloudPickle file)",
    "the model is logged as code: no pickle among its artifacts, no CloudPickle warning, and the loaded "
    "model predicts exactly the saved model's probabilities",
)
def test_registered_model_is_code_not_a_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment_id = client.create_experiment("code-model", artifact_location=(tmp_path / "art").as_uri())
    model_dir = save_tiny_convnet(tmp_path / "model", tta_level=1, seed=3)
    images, _ = synthetic_images(12, seed=4)
    saved = load_model(model_dir)
    expected = predict_logits(saved, images).softmax(1).numpy()

    # MLflow's CloudPickle warning is a log record of its "mlflow" logger, the type-hint one a warning.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = registry.log_and_register(
            client.create_run(experiment_id).info.run_id,
            model_dir,
            NAME,
            example_images=images[:4],
            example_probabilities=expected[:4],
            accuracy=0.5,
            test_set="A",
            evaluate_champion=lambda uri: 0.0,
        )
    mlflow_logger.removeHandler(handler)
    messages = [str(w.message) for w in caught] + [record.getMessage() for record in records]
    assert not [m for m in messages if "cloudpickle" in m.lower()], messages
    assert not [m for m in messages if "type hint" in m.lower()], messages

    model_uri = f"models:/{NAME}/{outcome['version']}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / "dl")))
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    # (MLflow records its cloudpickle version for every pyfunc; with model_code_path it unpickles nothing.)
    assert "python_model" not in flavor and "model_code_path" in flavor, flavor
    # The code MLflow runs on load is ours, stored with the model; the weights are safetensors.
    code = local / flavor["model_code_path"]
    assert code.read_text() == registry.MODEL_CODE.read_text()
    assert any(f.endswith("model.safetensors") for f in files), files

    loaded = mlflow.pyfunc.load_model(model_uri)
    assert type(loaded.unwrap_python_model()).__name__ == "Cifar10Classifier"
    probabilities = loaded.predict(images)
    assert probabilities.shape == (12, 10)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6, atol=1e-7)
