"""Stage 4, train: fit the configured model on the processed training split and save it with save_pretrained.

Per-epoch loss/accuracy (train and the held-out validation split) go to ``metrics/train_history.csv`` (a DVC
plot) and to MLflow; the model (safetensors, config.json with ``id2label``, and preprocessor_config.json
so that ``transformers.pipeline`` can load it) goes to ``models/cifar10/``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch
from transformers import PreTrainedModel

from cifar10_pipeline.core.data import atomic_output, load_split
from cifar10_pipeline.core.params import Params, TrainParams, load_params
from cifar10_pipeline.core.paths import (
    MODEL_DIR,
    PROCESSED_DIR,
    STAGE_EMISSIONS_DIR,
    TRAIN_CURVES,
    TRAIN_HISTORY,
    TRAIN_METRICS,
)
from cifar10_pipeline.evaluation import plots
from cifar10_pipeline.modeling.architectures import build_model, save_model
from cifar10_pipeline.modeling.inference import fit_temperature, predict_logits, resolve_precision
from cifar10_pipeline.modeling.model import batchnorm_precision
from cifar10_pipeline.training.loop import (
    EpochRecord,
    TrainingResult,
    describe_device,
    resolve_device,
    train_classifier,
)

if TYPE_CHECKING:
    from cifar10_pipeline.tracking.runs import StageRun

HISTORY_FIELDS = [f.name for f in dataclasses.fields(EpochRecord)]


def calibrate(model: PreTrainedModel, val_split) -> float | None:
    """Fit the softmax temperature on the validation split and store it in the config (None: no split)."""
    if not len(val_split):
        return None
    logits = predict_logits(model, val_split.images, calibrated=False)
    temperature = fit_temperature(logits, torch.as_tensor(val_split.labels))
    model.config.temperature = temperature
    return temperature


def train(
    hp: TrainParams,
    processed_dir: Path = PROCESSED_DIR,
    model_dir: Path = MODEL_DIR,
    history_file: Path = TRAIN_HISTORY,
    metrics_file: Path = TRAIN_METRICS,
    curves_file: Path = TRAIN_CURVES,
    on_epoch=None,
) -> tuple[PreTrainedModel, TrainingResult, dict]:
    device = resolve_device(hp.device)
    train_split = load_split(Path(processed_dir) / "train.npz")
    val_split = load_split(Path(processed_dir) / "val.npz")
    model = build_model(hp)
    history_file = Path(history_file)
    history_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(history_file) as staged_history:
        with open(staged_history, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
            writer.writeheader()

            def record_epoch(record: EpochRecord) -> None:
                writer.writerow(dataclasses.asdict(record))
                handle.flush()
                if on_epoch is not None:
                    on_epoch(record)

            result = train_classifier(model, train_split, val_split, hp, device, on_epoch=record_epoch)
        temperature = calibrate(model, val_split)
        with atomic_output(Path(model_dir)) as staged_model:
            save_model(model, staged_model, hp.model)  # weights, config.json and preprocessor_config.json
    last = result.history[-1]
    summary = {
        "model": hp.model,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": describe_device(device),
        "precision": resolve_precision(hp.precision, device),
        "batchnorm_precision": batchnorm_precision(model, device, resolve_precision(hp.precision, device)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "epochs": hp.epochs,
        "steps": result.steps,
        "train_images": len(train_split),
        "val_accuracy": last.val_accuracy,
        "val_loss": last.val_loss,
        "temperature": temperature,
        "train_loss": last.train_loss,
        "train_seconds": round(result.train_seconds, 2),
        "train_images_per_second": round(result.images_seen / max(result.train_seconds, 1e-9), 1),
        "stage_wall_seconds": round(time.time() - psutil.Process().create_time(), 2),
        "checkpoint_bytes": sum(f.stat().st_size for f in Path(model_dir).iterdir()),
    }
    with atomic_output(Path(metrics_file)) as staged_metrics:
        staged_metrics.write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_output(Path(curves_file)) as staged_curves:
        plots.training_curves([dataclasses.asdict(r) for r in result.history], staged_curves)
    return model, result, summary


def _start_tracking(
    params: Params, run_stack: contextlib.ExitStack, energy_stack: contextlib.ExitStack
) -> StageRun:
    """Open the stage's MLflow run and start codecarbon; each closes with its stack."""
    from cifar10_pipeline.tracking import emissions
    from cifar10_pipeline.tracking import runs as tracking

    run_log = run_stack.enter_context(tracking.stage_run("train", params))
    energy_stack.enter_context(
        emissions.measure("train", params.emissions.country_iso_code, STAGE_EMISSIONS_DIR / "train.json")
    )
    return run_log


def run(params: Params) -> dict:
    # Opening the MLflow run (store set-up, parent and child runs, parameters) and starting codecarbon
    # (hardware probing) take 3-6 s, as long as a whole gpu_fast training. So they happen on a helper thread
    # while the data loads and the model builds; epochs that end before the run is open are logged once it is.
    # On an exception the helper is joined first, then codecarbon stops and the run is marked FAILED.
    pending: list[EpochRecord] = []
    with (
        contextlib.ExitStack() as run_stack,
        contextlib.ExitStack() as energy_stack,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracking") as helper,
    ):
        opening = helper.submit(_start_tracking, params, run_stack, energy_stack)

        def log_pending() -> None:
            run_log = opening.result()  # re-raises here if MLflow or codecarbon could not start
            while pending:
                record = pending.pop(0)
                metrics = {k: v for k, v in dataclasses.asdict(record).items() if k not in ("epoch", "step")}
                run_log.log_metrics(metrics, step=record.epoch)

        def log_epoch(record: EpochRecord) -> None:
            pending.append(record)
            if opening.done():
                log_pending()

        _, _, summary = train(params.train, on_epoch=log_epoch)
        log_pending()
        energy_stack.close()  # the emissions record covers training, not the uploads below
        run_log = opening.result()
        run_log.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)}, to_parent=True)
        run_log.set_tags({"device": summary["device"], "architecture": summary["architecture"]})
        run_log.log_artifact(TRAIN_HISTORY)
        run_log.log_artifact(TRAIN_CURVES)
        run_log.log_artifact(MODEL_DIR, "model")
    val_accuracy = summary["val_accuracy"]
    validation = f"val_accuracy={val_accuracy:.4f}" if val_accuracy is not None else "no validation split"
    print(
        f"train: {validation}; {summary['train_seconds']:.1f}s of training "
        f"({summary['train_images_per_second']:.0f} img/s on {summary['device']}); model -> {MODEL_DIR}"
    )
    return summary


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    main()
