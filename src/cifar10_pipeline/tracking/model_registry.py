"""MLflow model registry: log the trained model with a signature, register it, and move ``champion`` only
to a version that beats the current champion on the same test set. The model is logged as code
(pyfunc_model.py beside this module), never pickled."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cifar10_pipeline import __version__
from cifar10_pipeline.core.provenance import pinned_requirement

CHAMPION = "champion"
ACCURACY_TAG = "test_accuracy"
TEST_SET_TAG = "test_set"


def test_set_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """Names the exact test images and labels, so accuracies are compared only on the same set."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()[:16]


# The pyfunc's code, logged as code (MLflow models-from-code): loading the model runs this file, no pickle.
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


def log_and_register(
    run_id: str,
    model_dir: Path,
    registered_name: str,
    example_images: np.ndarray,
    example_probabilities: np.ndarray,
    accuracy: float,
    test_set: str,
    evaluate_champion: Callable[[str], float],
) -> dict:
    """Log ``model_dir`` to ``run_id`` as a pyfunc model, register it, and apply the champion rule.

    The pyfunc is logged as code (``pyfunc_model.py``, MLflow's models-from-code) with the saved model
    directory (safetensors weights) as its artifact: loading it runs our code and unpickles nothing.

    ``evaluate_champion(model_uri)`` re-measures the current champion when it was scored on another test set.
    Returns {"registered_model", "version", "champion_version", "promoted", "previous_champion_accuracy"}:
    answers that depend on the store's history, so callers keep them in MLflow, out of DVC outputs.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    signature = infer_signature(example_images, example_probabilities)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"model_dir": str(model_dir)},
            signature=signature,
            input_example=example_images[:2],
            # Explicit requirements: inferring them would load the model again in a subprocess.
            pip_requirements=[
                f"cifar10-pipeline=={__version__}",
                pinned_requirement("torch"),  # as pyproject.toml pins them
                pinned_requirement("transformers"),
            ],
            registered_model_name=registered_name,
        )
    version = str(info.registered_model_version)
    client.set_model_version_tag(registered_name, version, ACCURACY_TAG, f"{accuracy:.6f}")
    client.set_model_version_tag(registered_name, version, TEST_SET_TAG, test_set)

    try:
        champion = client.get_model_version_by_alias(registered_name, CHAMPION)
    except MlflowException:
        champion = None
    previous = None
    if champion is not None and str(champion.version) != version:
        if champion.tags.get(TEST_SET_TAG) == test_set and ACCURACY_TAG in champion.tags:
            previous = float(champion.tags[ACCURACY_TAG])
        else:
            previous = evaluate_champion(f"models:/{registered_name}/{champion.version}")
    promoted = champion is None or previous is None or accuracy > previous
    if promoted:
        client.set_registered_model_alias(registered_name, CHAMPION, version)
    return {
        "registered_model": registered_name,
        "version": version,
        "champion_version": version if promoted else str(champion.version),
        "promoted": promoted,
        "previous_champion_accuracy": previous,
    }
