"""Stage 2, validate: check the raw CIFAR-10 splits with Great Expectations before anything uses them.

The suites live in ``cifar10_pipeline.validation.raw``: shards readable with the right ClassLabel
names, row counts, labels, exact class balance, every image a 32x32 RGB uint8 PNG, no duplicate images
within a split or between train and test (beyond the counts measured in the mirror, params.yaml
``validate.known_*``), and per-channel pixel statistics close to the data card.

Outputs, all or nothing: Data Docs (HTML) in ``reports/data_docs/`` and ``metrics/validation.json``. On any
failed expectation the stage removes both, prints one line per failure and exits non-zero.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cifar10_pipeline.core.data import SPLITS
from cifar10_pipeline.core.errors import run_cli
from cifar10_pipeline.core.io import atomic_output, remove_outputs, write_json_atomic
from cifar10_pipeline.core.params import ValidateParams, load_params
from cifar10_pipeline.core.paths import DATA_DOCS_DIR, RAW_DIR, VALIDATION_METRICS
from cifar10_pipeline.tracking.runs import stage_run
from cifar10_pipeline.validation.common import DataValidationError
from cifar10_pipeline.validation.raw import check_raw_splits


def validate(
    params: ValidateParams,
    raw_dir: Path = RAW_DIR,
    docs_dir: Path = DATA_DOCS_DIR,
    metrics_file: Path = VALIDATION_METRICS,
) -> dict[str, Any]:
    """Validate ``raw_dir`` against ``params`` (its split sizes among them); write Data Docs and the metrics
    file only if every expectation passes.

    Raises ``DataValidationError`` (one line per failed expectation), having written no outputs.
    """
    docs_dir, metrics_file = Path(docs_dir), Path(metrics_file)
    # Stale outputs of an earlier run must not survive a failure and pass for this run's result. A failure
    # after this writes nothing (each output appears whole or not at all); one between the two writes leaves
    # the Data Docs alone, which main()'s stage_run deletes with the other outputs of a failed stage.
    remove_outputs(metrics_file, docs_dir)
    started = time.perf_counter()
    with atomic_output(docs_dir) as staged_docs:
        summary = check_raw_splits(Path(raw_dir), params, docs_dir=staged_docs)
    write_json_atomic(metrics_file, summary)
    print(
        f"validate: {summary['evaluated']} expectations passed on {', '.join(SPLITS)} "
        f"in {time.perf_counter() - started:.1f} s -> {metrics_file}, {docs_dir / 'index.html'}"
    )
    return summary


def mlflow_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The summary as MLflow metrics: success/evaluated/failed overall and per split, plus measurements."""
    metrics = {key: float(summary[key]) for key in ("success", "evaluated", "failed")}
    for split in SPLITS:
        for key, value in summary.get(split, {}).items():
            if isinstance(value, bool | int | float):
                metrics[f"{split}.{key}"] = float(value)
            elif isinstance(value, dict):  # channel_mean / channel_std per channel
                metrics.update({f"{split}.{key}.{k}": float(v) for k, v in value.items() if v is not None})
    return metrics


def main() -> None:
    params = load_params()
    with stage_run("validate", params, outputs=(DATA_DOCS_DIR, VALIDATION_METRICS)) as run:
        try:
            summary = validate(params.validation)
        except DataValidationError as exc:
            if exc.summary:
                run.log_metrics(mlflow_metrics(exc.summary))
            # One line per failure, no traceback: the lines say what is wrong and where.
            raise SystemExit(
                f"{exc}\nvalidate: FAILED ({len(exc.failures)} expectation(s)); no outputs written"
            ) from None
        run.log_metrics(mlflow_metrics(summary))
        run.log_artifact(DATA_DOCS_DIR, "data_docs")


if __name__ == "__main__":
    run_cli(main)
