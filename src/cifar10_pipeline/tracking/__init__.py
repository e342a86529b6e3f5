"""MLflow runs, the model registry and codecarbon energy tracking."""
