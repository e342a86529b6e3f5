"""Benchmarks run on the machine their figures describe, outside the DVC pipeline and the shipped package:
``python benchmarks/training.py`` (training, records/benchmark.json) and ``python benchmarks/serving.py``
(the web service and the CLI, records/serving.json). Nothing in src/ imports from here."""
