"""Stage 4, train: fit the configured model on the processed training split and save it with save_pretrained.

Per-epoch loss/accuracy (train and the held-out validation split) go to ``metrics/train_history.csv`` (a DVC
plot) and to MLflow; the model (safetensors, config.json with ``id2label``, and preprocessor_config.json
so that ``transformers.pipeline`` can load it) goes to ``models/cifar10/``.

With ``train.nproc: N`` the stage restarts itself under torchrun: N processes train one model together
(training/distributed.py) and rank 0 alone writes the outputs, logs to MLflow and runs codecarbon. With
``train.checkpoint_every`` it saves a resumable state every few epochs, and a re-run after a crash resumes.
"""

from __future__ import annotations

import csv
import dataclasses
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar10_pipeline.core.data import load_split
from cifar10_pipeline.core.device import describe_device, resolve_device
from cifar10_pipeline.core.errors import run_cli
from cifar10_pipeline.core.io import atomic_output, write_json_atomic
from cifar10_pipeline.core.params import TrainParams, load_params
from cifar10_pipeline.core.paths import (
    MODEL_DIR,
    PROCESSED_DIR,
    STAGE_EMISSIONS_DIR,
    TRAIN_CHECKPOINT_DIR,
    TRAIN_CURVES,
    TRAIN_HISTORY,
    TRAIN_METRICS,
)
from cifar10_pipeline.evaluation import plots
from cifar10_pipeline.tracking import emissions
from cifar10_pipeline.tracking.runs import stage_run

# torch, transformers and the models are imported by the functions that use them, not here: `--help` and a
# bad param answer before the 3 s those imports take (benchmarks/stage_start.py).
if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from cifar10_pipeline.tracking.runs import StageRun
    from cifar10_pipeline.training.distributed import Ranks
    from cifar10_pipeline.training.state import EpochRecord, TrainingResult


def calibrate(model: PreTrainedModel, hp: TrainParams, train_split, val_split) -> dict[str, Any]:
    """Fit what inference needs after training, on held-out images, and store it in the config: selective
    TTA's threshold (on the validation split, else on the first training images), then the softmax
    temperature on the validation split's selective logits (none without one). Returns what was measured."""
    import torch

    from cifar10_pipeline.modeling.inference import (
        TTA_FIT_TRAIN_IMAGES,
        fit_selective_tta,
        fit_temperature,
        set_calibration_temperature,
    )

    held_out = val_split if len(val_split) else train_split.head(TTA_FIT_TRAIN_IMAGES)
    tta = fit_selective_tta(
        model, held_out.images, held_out.labels if len(val_split) else None, hp.tta_fraction, hp.precision
    )
    temperature = None
    if len(val_split):
        temperature = fit_temperature(tta.selective_logits, torch.as_tensor(val_split.labels))
        set_calibration_temperature(model, temperature)
    return {
        "temperature": temperature,
        "tta_confidence": tta.threshold,
        "tta_fitted_on": "validation" if len(val_split) else f"first {len(held_out)} training images",
        "val_tta_fraction": tta.fraction if len(val_split) else None,
        "val_accuracy_no_tta": tta.accuracy_plain,
        "val_accuracy_selective_tta": tta.accuracy_selective,
        "val_accuracy_full_tta": tta.accuracy_full,
    }


@dataclasses.dataclass(frozen=True)
class Trained:
    """What train() produced: the calibrated model, the loop's record and the summary measured so far."""

    model: PreTrainedModel
    result: TrainingResult
    summary: dict[str, Any]


def train(
    hp: TrainParams,
    processed_dir: Path = PROCESSED_DIR,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    ranks: Ranks | None = None,
    checkpoint_dir: Path | None = TRAIN_CHECKPOINT_DIR,
) -> Trained | None:
    """Fit and calibrate a fresh model on the processed splits; nothing is written (write_outputs does).

    Every rank of a torchrun job calls this; only rank 0 gets the Trained result (the others None).
    ``checkpoint_dir`` None: no checkpoints, whatever train.checkpoint_every says.
    """
    import torch

    from cifar10_pipeline.modeling.architectures import architecture, build_model, describe_architecture
    from cifar10_pipeline.modeling.base import batchnorm_precision
    from cifar10_pipeline.modeling.inference import resolve_precision
    from cifar10_pipeline.training import distributed
    from cifar10_pipeline.training.checkpoint import Checkpointer, fingerprint
    from cifar10_pipeline.training.distributed import Ranks
    from cifar10_pipeline.training.loop import train_classifier

    ranks = ranks or Ranks()
    device = distributed.device_for(ranks, resolve_device(hp.device))
    data_files = [Path(processed_dir) / "train.npz", Path(processed_dir) / "val.npz"]
    train_split, val_split = (load_split(f) for f in data_files)
    checkpointer = None
    if checkpoint_dir is not None and hp.checkpoint_every:
        checkpointer = Checkpointer(
            Path(checkpoint_dir),
            hp.checkpoint_every,
            fingerprint(hp, data_files, ranks.world_size),
            hp.resume,
        )
    model = build_model(hp)
    result = train_classifier(
        model, train_split, val_split, hp, device, on_epoch=on_epoch, ranks=ranks, checkpointer=checkpointer
    )
    if not ranks.is_main:
        return None
    fitted = calibrate(model, hp, train_split, val_split)
    last = result.history[-1]
    summary = {
        "model": hp.model,
        "architecture": type(model).__name__,
        # What the model card says of the network and its recipe, from the registry entry that built it.
        "model_description": describe_architecture(hp.model, model.config),
        "recipe": architecture(hp.model).recipe.name,
        "from_scratch": architecture(hp.model).from_scratch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": describe_device(device),
        "precision": resolve_precision(hp.precision, device),
        "batchnorm_precision": batchnorm_precision(model, device, resolve_precision(hp.precision, device)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "processes": ranks.world_size,
        "epochs": hp.epochs,
        "steps": result.steps,
        "train_images": len(train_split),
        "val_accuracy": last.val_accuracy,
        "val_loss": last.val_loss,
        **fitted,
        "train_loss": last.train_loss,
        "train_seconds": round(result.train_seconds, 2),
        "train_images_per_second": round(result.images_seen / max(result.train_seconds, 1e-9), 1),
        # After the first epoch, which pays for torch.compile and the CUDA-graph capture where they are on.
        "train_images_per_second_after_first_epoch": _rate_after_first_epoch(result, len(train_split)),
    }
    if device.type == "cuda":
        summary["train_peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return Trained(model, result, summary)


def _rate_after_first_epoch(result: Any, train_images: int) -> float | None:
    """Training images/s over every epoch but the first (None with a single epoch)."""
    later = result.history[1:]
    seconds = sum(epoch.seconds for epoch in later)
    if not later or seconds <= 0:
        return None
    steps = later[-1].step - result.history[0].step
    return round(steps * result.images_seen / max(result.steps, 1) / seconds, 1)


def write_outputs(
    trained: Trained,
    model_dir: Path = MODEL_DIR,
    history_file: Path = TRAIN_HISTORY,
    metrics_file: Path = TRAIN_METRICS,
    curves_file: Path = TRAIN_CURVES,
) -> dict[str, Any]:
    """Save the model, the per-epoch history, the summary and the curves; return the summary as written."""
    import psutil

    from cifar10_pipeline.modeling.architectures import save_model
    from cifar10_pipeline.training.state import EpochRecord

    with atomic_output(Path(model_dir)) as staged_model:
        save_model(trained.model, staged_model, trained.summary["model"])  # + preprocessor_config.json
    history = [dataclasses.asdict(record) for record in trained.result.history]
    with atomic_output(Path(history_file)) as staged_history, open(staged_history, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in dataclasses.fields(EpochRecord)])
        writer.writeheader()
        writer.writerows(history)
    summary = {
        **trained.summary,
        # The stage's whole cost up to a saved model: process start-up, imports and MLflow included.
        "stage_wall_seconds": round(time.time() - psutil.Process().create_time(), 2),
        "checkpoint_bytes": sum(f.stat().st_size for f in Path(model_dir).iterdir()),
    }
    write_json_atomic(metrics_file, summary)
    with atomic_output(Path(curves_file)) as staged_curves:
        plots.training_curves(history, staged_curves)
    return summary


def epoch_metrics(record: EpochRecord) -> dict[str, float | None]:
    """One epoch's record as MLflow metrics (the epoch is the step)."""
    return {k: v for k, v in dataclasses.asdict(record).items() if k not in ("epoch", "step")}


def log_results(run: StageRun, summary: dict[str, Any]) -> None:
    run.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)}, to_parent=True)
    run.set_tags({"device": summary["device"], "architecture": summary["architecture"]})
    run.log_artifact(TRAIN_HISTORY)
    run.log_artifact(TRAIN_CURVES)
    run.log_artifact(MODEL_DIR, "model")


def check_settings(hp: TrainParams, ranks: Ranks) -> None:
    """Refuse the settings a user can get wrong (device, process count, optimiser for the model) before
    torchrun starts: otherwise every process prints the same error and torchrun adds its own traceback."""
    from cifar10_pipeline.modeling.architectures import architecture
    from cifar10_pipeline.training import distributed

    device = resolve_device(hp.device)
    processes = ranks.world_size if ranks.launched else hp.nproc
    distributed.check_gpus(device, ranks.local_world_size if ranks.launched else hp.nproc)
    distributed.check_batch_split(hp.batch_size, processes)
    architecture(hp.model).check_params(hp)


def main() -> None:
    params = load_params()
    from cifar10_pipeline.training import distributed
    from cifar10_pipeline.training.checkpoint import Checkpointer

    ranks = distributed.from_environment()
    check_settings(params.train, ranks)
    if params.train.nproc > 1 and not ranks.launched:
        distributed.exec_torchrun("cifar10_pipeline.stages.train", params.train.nproc)  # does not return
    device = distributed.device_for(ranks, resolve_device(params.train.device))
    with distributed.process_group(ranks, device):
        if not ranks.is_main:
            train(params.train, ranks=ranks)  # a worker: its shard of every batch, no outputs, no tracking
            return
        outputs = (MODEL_DIR, TRAIN_HISTORY, TRAIN_METRICS, TRAIN_CURVES, STAGE_EMISSIONS_DIR / "train.json")
        with stage_run("train", params, outputs) as run:
            # The emissions record covers training and saving, not the uploads to MLflow. codecarbon
            # measures the whole machine, so rank 0's tracker counts every local rank (once).
            with emissions.measure(
                "train", params.emissions.country_iso_code, STAGE_EMISSIONS_DIR / "train.json"
            ):
                on_epoch = lambda r: run.log_metrics(epoch_metrics(r), step=r.epoch)  # noqa: E731
                trained = train(params.train, on_epoch=on_epoch, ranks=ranks)
                summary = write_outputs(trained)
            log_results(run, summary)
        # The model is saved: the resumable state has done its job.
        Checkpointer(TRAIN_CHECKPOINT_DIR, 0, "").discard()
    val_accuracy = summary["val_accuracy"]
    validation = f"val_accuracy={val_accuracy:.4f}" if val_accuracy is not None else "no validation split"
    print(
        f"train: {validation}; {summary['train_seconds']:.1f}s of training "
        f"({summary['train_images_per_second']:.0f} img/s on {summary['device']}); model -> {MODEL_DIR}"
    )


if __name__ == "__main__":
    run_cli(main)
