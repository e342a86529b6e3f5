"""MLflow model registry: log the trained model with a signature, register it, and move ``champion`` only
to a version that beats the current champion on the same test set. The model is logged as code
(pyfunc_model.py beside this module), never pickled."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


SETTLE_ROUNDS = 20


def set_champion(client: Any, registered_name: str, version: str, attempts: int = 3) -> None:
    """Point ``champion`` at ``version``. The server inserts the alias when it is missing and updates it
    otherwise, not atomically: of two writers creating it at once, one gets a unique-key violation on
    registered_model_aliases. The alias exists then, so the same call again updates it."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(registered_name, CHAMPION, version)
            return
        except MlflowException as error:
            if "registered_model_alias" not in str(error) or attempt == attempts - 1:
                raise


def settle_champion(client: Any, registered_name: str, test_set: str) -> str:
    """After moving ``champion``: move it on to the most accurate version scored on ``test_set`` until it
    holds one. Returns the champion's version.

    The alias has no compare-and-set: two writers at once can both read the old champion, and the one whose
    (worse) version lands last would keep the alias. Every writer that moves the alias re-reads it and the
    versions' accuracy tags (set before it read the champion) until a read finds the best version there, so
    the last move is always followed by a read that sees every version tagged before it, and a version
    tagged later is compared by its own writer: the champion ends on the most accurate version. Ties keep
    the earlier version, as "must beat" does for one writer. Only versions of the same test set compare by
    tag; a champion scored on another set is left to the rule above."""
    from mlflow.exceptions import MlflowException

    version = ""
    for _ in range(SETTLE_ROUNDS):
        try:
            champion = client.get_model_version_by_alias(registered_name, CHAMPION)
        except MlflowException:
            return version
        version = str(champion.version)
        if champion.tags.get(TEST_SET_TAG) != test_set or ACCURACY_TAG not in champion.tags:
            return version
        rivals = [
            v for v in client.search_model_versions(f"name = '{registered_name}'")
            if v.tags.get(TEST_SET_TAG) == test_set and ACCURACY_TAG in v.tags
        ]  # fmt: skip
        best = max(rivals, key=lambda v: (float(v.tags[ACCURACY_TAG]), -int(v.version)))
        if float(best.tags[ACCURACY_TAG]) <= float(champion.tags[ACCURACY_TAG]):
            return version
        set_champion(client, registered_name, best.version)
    return version


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
    champion_version = str(champion.version) if champion is not None else version
    if promoted:
        set_champion(client, registered_name, version)
        champion_version = settle_champion(client, registered_name, test_set)
    return {
        "registered_model": registered_name,
        "version": version,
        "champion_version": champion_version,
        "promoted": promoted,
        "previous_champion_accuracy": previous,
    }
