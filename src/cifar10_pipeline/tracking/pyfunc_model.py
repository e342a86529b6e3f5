"""The registered model's code, logged with MLflow's models-from-code (tracking/model_registry.py).

MLflow stores this file with the model and runs it when the model is loaded (``mlflow.pyfunc.load_model``);
nothing of the model is pickled. The weights are the saved transformers directory (safetensors), logged
as the artifact ``model_dir`` and loaded with the project's own loader.

Not imported by the package: MLflow executes it as a script, whose last line names the model object.
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np


class Cifar10Classifier(mlflow.pyfunc.PythonModel):
    """uint8 images (N, 32, 32, 3) in, class probabilities (N, 10) out; wraps the saved model."""

    def load_context(self, context: Any) -> None:
        from cifar10_pipeline.modeling.model import load_model

        self.model = load_model(context.artifacts["model_dir"])

    # MLflow reads model_input's hint: np.ndarray is one it takes without inferring a schema from it (the
    # schema is the signature log_and_register logs: uint8 images), so it neither warns nor converts.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        from cifar10_pipeline.modeling.inference import predict_logits

        return predict_logits(self.model, np.asarray(model_input, dtype=np.uint8)).softmax(1).numpy()


mlflow.models.set_model(Cifar10Classifier())
