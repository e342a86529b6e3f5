"""Integration tests: real stages, DVC experiments, MLflow and the benchmark on small real subsets."""
