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
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix

from cifar10_pipeline import CLASS_NAMES
from cifar10_pipeline.core.data import atomic_output, load_split, remove_outputs
from cifar10_pipeline.core.params import EvaluateParams, Params, load_params
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
from cifar10_pipeline.modeling.inference import predict_logits
from cifar10_pipeline.modeling.model import load_model
from cifar10_pipeline.training.loop import describe_device, resolve_device, synchronize


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_output(path) as staged, open(staged, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def robustness_table(
    model, images: np.ndarray, labels: np.ndarray, batch_size: int
) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for name in CORRUPTIONS:
        table[name] = {}
        for severity in SEVERITIES:
            corrupted = corrupt(images, name, severity, seed=severity)
            predictions = predict_logits(model, corrupted, batch_size).argmax(1).numpy()
            table[name][str(severity)] = float((predictions == labels).mean())
    return table


def evaluate(
    params: EvaluateParams,
    processed_dir: Path = PROCESSED_DIR,
    model_dir: Path = MODEL_DIR,
    metrics_file: Path = EVAL_METRICS,
    figures_dir: Path = EVAL_FIGURES_DIR,
) -> tuple[dict, np.ndarray]:
    """Compute every figure, then write all outputs; on any failure no output is left behind."""
    outputs = (
        metrics_file,
        CONFUSION_PAIRS,
        PER_CLASS_METRICS,
        RELIABILITY_BINS,
        ROBUSTNESS_METRICS,
        figures_dir,
    )
    test = load_split(Path(processed_dir) / "test.npz")
    device = resolve_device("auto")
    model = load_model(model_dir, device)

    synchronize(device)
    start = time.perf_counter()
    logits = predict_logits(model, test.images, params.batch_size, progress=True)
    synchronize(device)
    inference_seconds = time.perf_counter() - start
    probabilities = logits.softmax(1).numpy()
    predictions = probabilities.argmax(1)

    report = classification_metrics(test.labels, predictions)
    calib = calibration(probabilities, test.labels, params.calibration_bins)
    # The temperature the train stage fitted on the validation split (1.0 when there was none); nothing is
    # fitted on the test split. The same logits without it show what calibration changed.
    temperature = float(getattr(model.config, "temperature", 1.0))
    raw_probabilities = (logits * temperature).softmax(1).numpy()
    uncalibrated = calibration(raw_probabilities, test.labels, params.calibration_bins)
    subset = slice(0, min(params.robustness_images, len(test)))
    clean_subset_accuracy = float((predictions[subset] == test.labels[subset]).mean())
    robustness = robustness_table(model, test.images[subset], test.labels[subset], params.batch_size)
    worst = min((acc, f"{name}@{sev}") for name, row in robustness.items() for sev, acc in row.items())
    matrix = confusion_matrix(test.labels, predictions, labels=range(len(CLASS_NAMES)))
    off_diagonal = [
        (int(matrix[t, p]), t, p) for t in range(len(CLASS_NAMES)) for p in range(len(CLASS_NAMES)) if t != p
    ]
    most_confused = [
        {"true": CLASS_NAMES[t], "predicted": CLASS_NAMES[p], "count": count}
        for count, t, p in sorted(off_diagonal, reverse=True)[:3]
    ]
    picks = most_confident_mistakes(probabilities, test.labels, params.gallery_per_class)

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
        "most_confused": most_confused,
        "per_class": report["per_class"],
        "robustness": {
            "images": subset.stop,
            "clean_accuracy": clean_subset_accuracy,
            "mean_corrupted_accuracy": float(
                np.mean([a for row in robustness.values() for a in row.values()])
            ),
            "worst": {"accuracy": worst[0], "corruption": worst[1]},
            "accuracy": robustness,
        },
        "inference": {
            "device": describe_device(device),
            "tta_level": int(model.config.tta_level),
            "batch_size": params.batch_size,
            "seconds": round(inference_seconds, 3),
            "images_per_second": round(len(test) / inference_seconds, 1),
        },
    }
    try:
        with atomic_output(Path(metrics_file)) as staged:
            staged.write_text(json.dumps(metrics, indent=2) + "\n")
        _write_csv(
            CONFUSION_PAIRS,
            [
                {"actual": CLASS_NAMES[a], "predicted": CLASS_NAMES[p]}
                for a, p in zip(test.labels, predictions, strict=True)
            ],
        )
        _write_csv(
            PER_CLASS_METRICS, [{"class": name, **scores} for name, scores in report["per_class"].items()]
        )
        _write_csv(
            RELIABILITY_BINS,
            [
                {"confidence": b["confidence"], "accuracy": b["accuracy"], "count": b["count"]}
                for b in calib["bins"]
                if b["count"]
            ],
        )
        _write_csv(
            ROBUSTNESS_METRICS,
            [
                {"corruption": name, "severity": int(sev), "accuracy": acc}
                for name, row in robustness.items()
                for sev, acc in row.items()
            ],
        )
        with atomic_output(Path(figures_dir)) as staged_dir:
            staged_dir.mkdir()
            plots.confusion_matrix(
                matrix,
                staged_dir / "confusion_matrix.png",
                f"Confusion matrix, test accuracy {report['accuracy']:.2%}",
            )
            plots.per_class_scores(report["per_class"], staged_dir / "per_class.png")
            plots.reliability_diagram(calib["bins"], calib["ece"], staged_dir / "reliability.png")
            plots.robustness(robustness, clean_subset_accuracy, staged_dir / "robustness.png")
            plots.mistake_gallery(test.images, probabilities, test.labels, picks, staged_dir / "mistakes.png")
    except BaseException:
        remove_outputs(*outputs)
        raise
    return metrics, probabilities


def run(params: Params) -> dict:
    from cifar10_pipeline.tracking import emissions
    from cifar10_pipeline.tracking import model_registry as registry
    from cifar10_pipeline.tracking import runs as tracking

    with tracking.stage_run("evaluate", params) as run_log:
        with emissions.measure(
            "evaluate", params.emissions.country_iso_code, STAGE_EMISSIONS_DIR / "evaluate.json"
        ):
            metrics, probabilities = evaluate(params.evaluate)
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
        run_log.log_metrics(flat, to_parent=True)
        for path in (EVAL_METRICS, EVAL_FIGURES_DIR, CONFUSION_PAIRS, PER_CLASS_METRICS):
            run_log.log_artifact(path)

        test = load_split(PROCESSED_DIR / "test.npz")

        def champion_accuracy(model_uri: str) -> float:
            import mlflow

            champion = mlflow.pyfunc.load_model(model_uri)
            return float((champion.predict(test.images).argmax(1) == test.labels).mean())

        outcome = registry.log_and_register(
            run_log.run_id,
            MODEL_DIR,
            params.mlflow.registered_model,
            example_images=test.images[:8],
            example_probabilities=probabilities[:8],
            accuracy=metrics["accuracy"],
            test_set=registry.test_set_fingerprint(test.images, test.labels),
            evaluate_champion=champion_accuracy,
        )
        run_log.set_tags({f"registry.{k}": str(v) for k, v in outcome.items()}, to_parent=True)
    print(
        f"evaluate: accuracy={metrics['accuracy']:.4f} f1_macro={metrics['f1_macro']:.4f} "
        f"ece={metrics['ece']:.4f}; registered {outcome['registered_model']} v{outcome['version']} "
        f"(champion: v{outcome['champion_version']})"
    )
    return metrics


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    main()
