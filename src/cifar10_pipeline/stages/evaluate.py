"""Stage 5, evaluate: measure the trained model on the untouched test split.

Writes ``metrics/eval.json`` (accuracy, f1_macro, f1_weighted at the top; per-class figures, the best/worst
class gap, calibration, robustness under corruptions, inference speed), DVC plot data (confusion pairs,
per-class scores, reliability bins, robustness) and PNG figures in ``reports/figures/``. Then logs everything
to MLflow and registers the model, moving the ``champion`` alias only to a better model.

The registry's answers (version numbers, where ``champion`` points) depend on the MLflow store's history,
which DVC does not see, so they stay in MLflow (run tags ``registry.*``) and go into no DVC output.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cifar10_pipeline import CLASS_NAMES
from cifar10_pipeline.core.data import ArraySplit, load_split
from cifar10_pipeline.core.device import describe_device, resolve_device, synchronize
from cifar10_pipeline.core.errors import run_cli
from cifar10_pipeline.core.io import atomic_output, write_json_atomic
from cifar10_pipeline.core.params import EvaluateParams, load_params
from cifar10_pipeline.core.paths import (
    CONFUSION_PAIRS,
    EVAL_FIGURES_DIR,
    EVAL_METRICS,
    MODEL_DIR,
    PER_CLASS_METRICS,
    PROCESSED_DIR,
    RELIABILITY_BINS,
    ROBUSTNESS_METRICS,
    STAGE_EMISSIONS_DIR,
)
from cifar10_pipeline.evaluation import plots
from cifar10_pipeline.evaluation.metrics import (
    CORRUPTIONS,
    SEVERITIES,
    calibration,
    classification_metrics,
    corrupt,
    most_confident_mistakes,
)
from cifar10_pipeline.tracking import emissions
from cifar10_pipeline.tracking import model_registry as registry
from cifar10_pipeline.tracking.runs import stage_run

# torch, transformers, scikit-learn and the models are imported by the functions that use them, not here:
# `--help` and a bad param answer before the 3.5 s those imports take (benchmarks/stage_start.py).
if TYPE_CHECKING:
    import torch

    from cifar10_pipeline.tracking.runs import StageRun


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_output(path) as staged, open(staged, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def robustness_table(
    model, images: np.ndarray, labels: np.ndarray, batch_size: int, precision: str = "auto"
) -> dict[str, dict[str, float]]:
    from cifar10_pipeline.modeling.inference import predict_logits

    table: dict[str, dict[str, float]] = {}
    for name in CORRUPTIONS:
        table[name] = {}
        for severity in SEVERITIES:
            corrupted = corrupt(images, name, severity, seed=severity)
            predictions = predict_logits(model, corrupted, batch_size, precision=precision).argmax(1).numpy()
            table[name][str(severity)] = float((predictions == labels).mean())
    return table


@dataclass(frozen=True)
class Evaluation:
    """What evaluate() measured: the metrics file's content and what the CSVs and figures are drawn from."""

    metrics: dict[str, Any]
    test: ArraySplit
    probabilities: np.ndarray  # calibrated, (N, 10)
    confusion: np.ndarray  # counts, [true, predicted]
    reliability_bins: list[dict[str, Any]]
    mistakes: Any  # most_confident_mistakes' picks, for the gallery

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(1)


def timed_logits(
    model: Any, images: np.ndarray, batch_size: int, device: torch.device, precision: str = "auto"
) -> tuple[Any, float]:
    """The model's (calibrated) logits on ``images`` and the device-synchronised seconds they took."""
    from cifar10_pipeline.modeling.inference import predict_logits

    synchronize(device)
    start = time.perf_counter()
    logits = predict_logits(model, images, batch_size, precision=precision, progress=True)
    synchronize(device)
    return logits, time.perf_counter() - start


def calibration_with_and_without_temperature(
    logits: Any, temperature: float, labels: np.ndarray, bins: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibration of the calibrated probabilities, and of the same logits with the temperature undone."""
    calibrated = calibration(logits.softmax(1).numpy(), labels, bins)
    uncalibrated = calibration((logits * temperature).softmax(1).numpy(), labels, bins)
    return calibrated, uncalibrated


def robustness_summary(
    model: Any, test: ArraySplit, predictions: np.ndarray, params: EvaluateParams
) -> dict[str, Any]:
    """Accuracy under each corruption and severity on the first ``robustness_images`` test images."""
    subset = slice(0, min(params.robustness_images, len(test)))
    table = robustness_table(
        model, test.images[subset], test.labels[subset], params.batch_size, params.precision
    )
    worst = min((acc, f"{name}@{sev}") for name, row in table.items() for sev, acc in row.items())
    return {
        "images": subset.stop,
        "clean_accuracy": float((predictions[subset] == test.labels[subset]).mean()),
        "mean_corrupted_accuracy": float(np.mean([a for row in table.values() for a in row.values()])),
        "worst": {"accuracy": worst[0], "corruption": worst[1]},
        "accuracy": table,
    }


def most_confused(matrix: np.ndarray, top: int = 3) -> list[dict[str, Any]]:
    """The ``top`` (true, predicted) class pairs the model mixes up most often."""
    classes = range(len(CLASS_NAMES))
    off_diagonal = [(int(matrix[t, p]), t, p) for t in classes for p in classes if t != p]
    return [
        {"true": CLASS_NAMES[t], "predicted": CLASS_NAMES[p], "count": count}
        for count, t, p in sorted(off_diagonal, reverse=True)[:top]
    ]


def evaluate(
    params: EvaluateParams, processed_dir: Path = PROCESSED_DIR, model_dir: Path = MODEL_DIR
) -> Evaluation:
    """Measure the saved model on the test split; nothing is written (write_outputs does that)."""
    from sklearn.metrics import confusion_matrix

    from cifar10_pipeline.modeling.inference import calibration_temperature, resolve_precision, tta_confidence
    from cifar10_pipeline.modeling.model import load_model

    test = load_split(Path(processed_dir) / "test.npz")
    device = resolve_device(params.device, key="evaluate.device")
    model = load_model(model_dir, device)
    logits, inference_seconds = timed_logits(model, test.images, params.batch_size, device, params.precision)
    probabilities = logits.softmax(1).numpy()
    predictions = probabilities.argmax(1)
    report = classification_metrics(test.labels, predictions)
    # The temperature the train stage fitted on the validation split (1.0 when there was none); nothing is
    # fitted on the test split. The same logits without it show what calibration changed.
    temperature = calibration_temperature(model.config)
    calib, uncalibrated = calibration_with_and_without_temperature(
        logits, temperature, test.labels, params.calibration_bins
    )
    robustness = robustness_summary(model, test, predictions, params)
    matrix = confusion_matrix(test.labels, predictions, labels=range(len(CLASS_NAMES)))
    metrics = {
        "accuracy": report["accuracy"],
        "f1_macro": report["f1_macro"],
        "f1_weighted": report["f1_weighted"],
        "test_images": len(test),
        "ece": calib["ece"],
        "nll": calib["nll"],
        "temperature": temperature,
        "ece_before_temperature": uncalibrated["ece"],
        "mean_confidence": calib["mean_confidence"],
        "class_gap": report["class_gap"],
        "most_confused": most_confused(matrix),
        "per_class": report["per_class"],
        "robustness": robustness,
        "inference": {
            "device": describe_device(device),
            "precision": resolve_precision(params.precision, device),
            "tta_level": int(model.config.tta_level),
            # Selective TTA: only images less confident than this get the views (None: every image).
            "tta_confidence": tta_confidence(model.config),
            "batch_size": params.batch_size,
            "seconds": round(inference_seconds, 3),
            "images_per_second": round(len(test) / inference_seconds, 1),
        },
    }
    mistakes = most_confident_mistakes(probabilities, test.labels, params.gallery_per_class)
    return Evaluation(metrics, test, probabilities, matrix, calib["bins"], mistakes)


def write_outputs(
    evaluation: Evaluation, metrics_file: Path = EVAL_METRICS, figures_dir: Path = EVAL_FIGURES_DIR
) -> None:
    """The metrics file, the four DVC plot tables and the figures, each written all or nothing."""
    metrics, test, predictions = evaluation.metrics, evaluation.test, evaluation.predictions
    robustness = metrics["robustness"]
    write_json_atomic(metrics_file, metrics)
    _write_csv(
        CONFUSION_PAIRS,
        [
            {"actual": CLASS_NAMES[a], "predicted": CLASS_NAMES[p]}
            for a, p in zip(test.labels, predictions, strict=True)
        ],
    )
    _write_csv(
        PER_CLASS_METRICS, [{"class": name, **scores} for name, scores in metrics["per_class"].items()]
    )
    _write_csv(
        RELIABILITY_BINS,
        [
            {"confidence": b["confidence"], "accuracy": b["accuracy"], "count": b["count"]}
            for b in evaluation.reliability_bins
            if b["count"]
        ],
    )
    _write_csv(
        ROBUSTNESS_METRICS,
        [
            {"corruption": name, "severity": int(sev), "accuracy": acc}
            for name, row in robustness["accuracy"].items()
            for sev, acc in row.items()
        ],
    )
    with atomic_output(Path(figures_dir)) as staged_dir:
        staged_dir.mkdir()
        plots.confusion_matrix(
            evaluation.confusion,
            staged_dir / "confusion_matrix.png",
            f"Confusion matrix, test accuracy {metrics['accuracy']:.2%}",
        )
        plots.per_class_scores(metrics["per_class"], staged_dir / "per_class.png")
        plots.reliability_diagram(evaluation.reliability_bins, metrics["ece"], staged_dir / "reliability.png")
        plots.robustness(robustness["accuracy"], robustness["clean_accuracy"], staged_dir / "robustness.png")
        plots.mistake_gallery(
            test.images,
            evaluation.probabilities,
            test.labels,
            evaluation.mistakes,
            staged_dir / "mistakes.png",
        )


def log_results(run: StageRun, metrics: dict[str, Any]) -> None:
    """The headline figures as metrics of the stage run and the parent, and the outputs as artifacts."""
    flat = {
        "test_accuracy": metrics["accuracy"],
        "test_f1_macro": metrics["f1_macro"],
        "test_f1_weighted": metrics["f1_weighted"],
        "test_ece": metrics["ece"],
        "test_nll": metrics["nll"],
        "class_f1_gap": metrics["class_gap"]["f1_gap"],
        "robust_mean_accuracy": metrics["robustness"]["mean_corrupted_accuracy"],
        "inference_images_per_second": metrics["inference"]["images_per_second"],
    }
    flat.update({f"f1_{name}": s["f1"] for name, s in metrics["per_class"].items()})
    run.log_metrics(flat, to_parent=True)
    for path in (EVAL_METRICS, EVAL_FIGURES_DIR, CONFUSION_PAIRS, PER_CLASS_METRICS):
        run.log_artifact(path)


def register(run: StageRun, evaluation: Evaluation, registered_model: str) -> dict[str, Any]:
    """Log and register the model; ``champion`` moves only to a model that beats it on this test split."""
    test = evaluation.test

    def champion_accuracy(model_uri: str) -> float:
        import mlflow

        champion = mlflow.pyfunc.load_model(model_uri)
        return float((champion.predict(test.images).argmax(1) == test.labels).mean())

    # A server lost mid-registration: the stage moves to the local store and registers there. A version the
    # server created before it went stays there; without its accuracy tag the champion rule never picks it.
    outcome = run.tracked(
        lambda: registry.log_and_register(
            run.run_id,
            MODEL_DIR,
            registered_model,
            example_images=test.images[:8],
            example_probabilities=evaluation.probabilities[:8],
            accuracy=evaluation.metrics["accuracy"],
            test_set=registry.test_set_fingerprint(test.images, test.labels),
            evaluate_champion=champion_accuracy,
        )
    )
    run.set_tags({f"registry.{k}": str(v) for k, v in outcome.items()}, to_parent=True)
    return outcome


def main() -> None:
    params = load_params()
    energy_file = STAGE_EMISSIONS_DIR / "evaluate.json"
    outputs = (
        EVAL_METRICS,
        CONFUSION_PAIRS,
        PER_CLASS_METRICS,
        RELIABILITY_BINS,
        ROBUSTNESS_METRICS,
        EVAL_FIGURES_DIR,
        energy_file,
    )
    with stage_run("evaluate", params, outputs) as run:
        with emissions.measure("evaluate", params.emissions.country_iso_code, energy_file):
            evaluation = evaluate(params.evaluate)
            write_outputs(evaluation)
        log_results(run, evaluation.metrics)
        outcome = register(run, evaluation, params.mlflow.registered_model)
    metrics = evaluation.metrics
    print(
        f"evaluate: accuracy={metrics['accuracy']:.4f} f1_macro={metrics['f1_macro']:.4f} "
        f"ece={metrics['ece']:.4f}; registered {outcome['registered_model']} v{outcome['version']} "
        f"(champion: v{outcome['champion_version']})"
    )


if __name__ == "__main__":
    run_cli(main)
