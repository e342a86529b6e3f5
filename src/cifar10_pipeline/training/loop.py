"""The training loop, readable in one sitting. Used by the train stage and by the benchmark alike.

Recipe (the conv net's ``speed_run``, see modeling/architectures.py): the whole training set lives on the
device as one normalised tensor; each epoch makes one augmented copy (random translation with reflect
padding, alternating flips) and walks it in a fresh random order; Nesterov SGD on a summed, label-smoothed
loss with a short linear warm-up and a linear decay; norm-layer biases take a much larger learning rate; a
lookahead pulls the weights towards a slow average every few steps. With ``filter_optimizer: muon`` the
conv filters take orthogonalised momentum steps instead (Muon), which reaches the same accuracy in fewer
epochs. Transformers (the from-scratch ``cifar_vit`` or a Hub checkpoint such as ViT) go through the same
loop with AdamW on the mean loss. Which recipe, and which parts of the network it treats specially, comes
from the architecture registry.

``train_classifier`` is the setup, then the epoch loop. What it builds on lives beside it: the optimisers
and the lookahead in training/optim.py, the CUDA-graph capture of the step (``train.cuda_graphs``) in
training/cuda_graphs.py, the loop's state and its capture for a checkpoint in training/state.py.

Under torchrun (training/distributed.py) every rank walks the same augmented epoch in the same order and
trains on its shard of each global batch; DDP averages the gradients. ``train.checkpoint_every`` saves the
loop's whole state after every N epochs (training/checkpoint.py) and a re-run resumes from it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cifar10_pipeline.core.data import ArraySplit
from cifar10_pipeline.core.device import synchronize
from cifar10_pipeline.core.params import TrainParams
from cifar10_pipeline.modeling.architectures import Architecture, architecture
from cifar10_pipeline.modeling.inference import autocast, fit_input_size, normalize, tta_logits
from cifar10_pipeline.training import distributed
from cifar10_pipeline.training.checkpoint import Checkpointer
from cifar10_pipeline.training.cuda_graphs import CapturedStep
from cifar10_pipeline.training.distributed import Ranks, check_batch_split
from cifar10_pipeline.training.optim import Lookahead, make_optimizers, param_groups, set_learning_rate
from cifar10_pipeline.training.state import EpochRecord, TrainingResult, capture_state, restore_state

# Fixed constants of the recipes, not params: they change results, but no profile has needed another value
# and none was tuned here (they are the airbench recipe's). Changing one is a code change, and dvc.yaml's
# training/ dep re-runs the train stage when it happens. (ADAMW_BETAS lives with the optimisers.)
LOOKAHEAD_EVERY = 5  # steps between lookahead pulls
LOOKAHEAD_DECAY = 0.95  # per-step weight of the slow average (raised to the pull period, scaled by progress)
WARMUP_START = 0.2  # the learning rate's fraction at step 0, ramped to 1 over train.warmup_fraction
WHITENING_SAMPLE = 5000  # training images whose patch covariance initialises the whitening layer

Step = Callable[[torch.Tensor, torch.Tensor], None]


def augment(
    images: torch.Tensor,
    translate: int,
    flip_mask: torch.Tensor | None,
    generator: torch.Generator,
    cutout: int = 0,
) -> torch.Tensor:
    """Random translation by up to ``translate`` pixels (reflect padding), the given horizontal flips and a
    ``cutout`` x ``cutout`` square set to the mean (0 after normalisation) at a random place in each image."""
    n, _, h, w = images.shape
    out = images
    if translate > 0:
        padded = F.pad(images, (translate,) * 4, mode="reflect")
        shifts = torch.randint(0, 2 * translate + 1, (2, n), generator=generator).to(images.device)
        # One gather: image i's rows start at shifts[0, i], its columns at shifts[1, i]. No per-shift masks
        # or nonzero() calls, so the GPU never waits for the CPU here.
        rows = (shifts[0, :, None] + torch.arange(h, device=images.device))[:, :, None]
        cols = (shifts[1, :, None] + torch.arange(w, device=images.device))[:, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None]
        # Advanced indices around a slice put their dimensions first: (N, H, W, C), i.e. channels_last.
        out = padded[batch, :, rows, cols].permute(0, 3, 1, 2)
    if flip_mask is not None:
        out = torch.where(flip_mask.view(-1, 1, 1, 1), out.flip(-1), out)
    if cutout > 0:
        # Square centres anywhere in the image, so squares may be clipped at the border (DeVries & Taylor).
        centres = torch.randint(0, h, (2, n), generator=generator).to(images.device)
        rows = torch.arange(h, device=images.device)
        cols = torch.arange(w, device=images.device)
        low = centres - cutout // 2
        inside_rows = (rows[None] >= low[0, :, None]) & (rows[None] < low[0, :, None] + cutout)
        inside_cols = (cols[None] >= low[1, :, None]) & (cols[None] < low[1, :, None] + cutout)
        square = inside_rows[:, :, None] & inside_cols[:, None, :]
        out = out.masked_fill(square[:, None], 0.0)
    return out.contiguous(memory_format=torch.channels_last)


def lr_factor(step: int, total_steps: int, warmup_fraction: float, final_fraction: float) -> float:
    """Piecewise-linear schedule: WARMUP_START -> 1 over the warm-up, then down to ``final_fraction``."""
    peak = max(1.0, warmup_fraction * total_steps)
    return float(np.interp(step, [0, peak, total_steps], [WARMUP_START, 1.0, final_fraction]))


@dataclass(frozen=True)
class Schedule:
    """The run's steps: global batch size, steps per epoch and in all, and the learning rate's factor."""

    batch_size: int  # the global batch: each rank trains on its shard of it
    steps_per_epoch: int  # the last partial batch is dropped: constant shapes
    total_steps: int
    epochs: int  # epochs the loop walks; the last one stops at total_steps
    whiten_bias_steps: int  # after these, the data-initialised bias's learning rate is 0
    warmup_fraction: float
    final_lr_fraction: float

    @classmethod
    def of(cls, hp: TrainParams, train_images: int, world_size: int) -> Schedule:
        batch_size = min(hp.batch_size, train_images)
        check_batch_split(batch_size, world_size)
        steps_per_epoch = train_images // batch_size
        total_steps = max(1, math.ceil(hp.epochs * steps_per_epoch))
        return cls(
            batch_size=batch_size,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            epochs=math.ceil(total_steps / steps_per_epoch),
            whiten_bias_steps=math.ceil(hp.whiten_bias_epochs * steps_per_epoch),
            warmup_fraction=hp.warmup_fraction,
            final_lr_fraction=hp.final_lr_fraction,
        )

    def factor(self, step: int) -> float:
        """The learning rate at ``step`` as a fraction of the base rate (``lr_factor``)."""
        return lr_factor(step, self.total_steps, self.warmup_fraction, self.final_lr_fraction)


@dataclass(frozen=True)
class EpochSums:
    """The epoch's summed training loss and correct predictions, added up on the device by every step (a
    captured step adds into these very tensors, so they are zeroed in place, never replaced)."""

    loss: torch.Tensor
    correct: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> EpochSums:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))

    def zero_(self) -> None:
        self.loss.zero_()
        self.correct.zero_()


@torch.no_grad()
def evaluate_normalised(
    model: PreTrainedModel,
    x: torch.Tensor,
    labels: torch.Tensor,
    precision: str,
    batch_size: int = 1000,
    tta_level: int = 0,
    below_confidence: float | None = None,
) -> tuple[float, float]:
    """(mean loss, accuracy) on already-normalised images held on the device; ``below_confidence``: selective
    test-time augmentation (``inference.tta_logits``)."""
    was_training = model.training
    model.eval()
    # Summed on the device and read once at the end: no wait for the GPU between batches.
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)  # as exact as a Python float sum
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], labels[start : start + batch_size]
        with autocast(x.device, precision):
            logits = tta_logits(model, xb, tta_level, below_confidence)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    return loss_sum.item() / len(x), correct.item() / len(x)


def train_classifier(
    model: PreTrainedModel,
    train: ArraySplit,
    val: ArraySplit | None,
    hp: TrainParams,
    device: torch.device,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    progress: bool = True,
    ranks: Ranks | None = None,
    checkpointer: Checkpointer | None = None,
) -> TrainingResult:
    """Train ``model`` in place on ``train``; report validation after every epoch (rank 0 only).

    Under torchrun, ``ranks`` says which shard of each batch this process takes. With a ``checkpointer``,
    the state is saved every few epochs and a matching saved state is resumed instead of starting over.
    """
    # Setup: data and model on the device, the schedule, the optimisers and the step (captured on a GPU).
    ranks = ranks or Ranks()
    spec = architecture(hp.model)
    generator = torch.Generator().manual_seed(hp.seed)
    x_train, y_train, x_val, y_val = _to_device(model, train, val, spec, device)
    schedule = Schedule.of(hp, len(x_train), ranks.world_size)
    graphs = _use_cuda_graphs(hp, device, ranks)
    optimizers = make_optimizers(model, hp, graph_safe=graphs)
    rates = [(group, float(group["lr"])) for group in param_groups(optimizers)]  # (group, base rate)
    reported_lr = next(lr for group, lr in rates if group["role"] in ("weights", "filters"))
    lookahead = Lookahead(model) if (hp.lookahead and spec.recipe.lookahead) else None
    forward = _forward_module(model, hp, device, ranks)
    sums = EpochSums.zeros(device)
    run_step = _train_step(
        forward, optimizers, sums, spec, hp, device, model.config.image_size, ranks.world_size
    )
    if graphs:
        first_batch = slice(0, schedule.batch_size)
        run_step = CapturedStep(run_step, x_train[first_batch], y_train[first_batch], model, optimizers)
        if lookahead is not None:
            lookahead.capture()
    # First-epoch flips are random; after that each image flips on every other epoch, so the network
    # sees both orientations of every image every two epochs (less variance than independent coin tosses).
    first_flips = torch.rand(len(x_train), generator=generator).lt(0.5).to(device)
    result = TrainingResult()
    step, first_epoch = _resume(checkpointer, model, optimizers, lookahead, generator, result, graphs, ranks)
    bar = tqdm(
        total=schedule.total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not (progress and ranks.is_main),
        mininterval=1.0,
    )
    validate = x_val is not None and ranks.is_main

    # The epoch loop: one augmented copy of the training set per epoch, walked in a fresh random order.
    for epoch in range(first_epoch, schedule.epochs):
        synchronize(device)
        epoch_start = time.perf_counter()
        flips = (first_flips ^ bool(epoch % 2)) if hp.flip else None
        x_epoch = augment(x_train, hp.translate, flips, generator, hp.cutout)
        order = torch.randperm(len(x_train), generator=generator).to(device)
        sums.zero_()
        step, seen = _train_epoch(
            step, x_epoch, y_train, order, schedule, rates, run_step, lookahead, ranks, bar
        )
        synchronize(device)
        seconds = time.perf_counter() - epoch_start
        result.train_seconds += seconds
        result.images_seen += seen
        distributed.all_reduce_sum(sums.loss, sums.correct)  # the whole batch's statistics, not this shard's
        val_loss, val_acc = (
            evaluate_normalised(model, x_val, y_val, hp.precision) if validate else (None, None)
        )
        lr = reported_lr * schedule.factor(step)
        record = _epoch_record(epoch, step, lr, sums, seen, val_loss, val_acc, seconds)
        result.history.append(record)
        bar.set_postfix(
            loss=f"{record.train_loss:.3f}", val_acc=f"{val_acc:.4f}" if val_acc is not None else "-"
        )
        if on_epoch is not None:
            on_epoch(record)
        if checkpointer is not None and checkpointer.due(epoch + 1, schedule.epochs) and ranks.is_main:
            checkpointer.save(capture_state(epoch + 1, step, model, optimizers, lookahead, generator, result))
    bar.close()
    result.steps = step
    model.eval()
    return result


# --- setup -----------------------------------------------------------------------------------------------


def _to_device(
    model: PreTrainedModel,
    train: ArraySplit,
    val: ArraySplit | None,
    spec: Architecture,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The model and the normalised splits on the device (no validation tensors for an empty ``val``), the
    data-initialised layer initialised."""
    model.to(device=device, memory_format=torch.channels_last).train()
    cfg = model.config
    x_train = normalize(torch.as_tensor(train.images).to(device), cfg.image_mean, cfg.image_std)
    y_train = torch.as_tensor(train.labels).to(device)
    x_val = y_val = None
    if val is not None and len(val):
        x_val = normalize(torch.as_tensor(val.images).to(device), cfg.image_mean, cfg.image_std)
        y_val = torch.as_tensor(val.labels).to(device)
    spec.check_model(model)
    if spec.init_from_data is not None:
        spec.init_from_data(model, x_train[:WHITENING_SAMPLE])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once
    return x_train, y_train, x_val, y_val


def _use_cuda_graphs(hp: TrainParams, device: torch.device, ranks: Ranks) -> bool:
    """Whether the step is captured as a CUDA graph (training/cuda_graphs.py)."""
    # A captured graph would have to hold DDP's all-reduce as well: several processes run eagerly.
    if hp.cuda_graphs and ranks.distributed and ranks.is_main:
        print("train: cuda_graphs is ignored with several processes (DDP runs the step eagerly)", flush=True)
    return hp.cuda_graphs and device.type == "cuda" and not ranks.distributed


def _forward_module(
    model: PreTrainedModel, hp: TrainParams, device: torch.device, ranks: Ranks
) -> torch.nn.Module:
    """What the step calls: the model, wrapped in DDP under torchrun, compiled with ``train.compile``."""
    forward: torch.nn.Module = model
    if ranks.distributed:
        # Built after the data-dependent init: DDP copies rank 0's weights and buffers to every rank.
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return torch.compile(forward, mode=hp.compile) if hp.compile else forward


def _train_step(
    forward: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    sums: EpochSums,
    spec: Architecture,
    hp: TrainParams,
    device: torch.device,
    image_size: int,
    world_size: int,
) -> Step:
    """One optimisation step on a batch (this rank's shard), its loss and accuracy added to ``sums``."""

    def train_step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        with autocast(device, hp.precision):
            logits = forward(pixel_values=fit_input_size(xb, image_size)).logits.float()
        losses = F.cross_entropy(logits, yb, label_smoothing=hp.label_smoothing, reduction="none")
        # DDP averages gradients over ranks: a summed loss is scaled back up to the global batch's sum.
        loss = losses.sum() * world_size if spec.recipe.summed_loss else losses.mean()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        with torch.no_grad():
            sums.loss.add_(losses.sum())
            sums.correct.add_((logits.argmax(1) == yb).sum())

    return train_step


def _resume(
    checkpointer: Checkpointer | None,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    lookahead: Lookahead | None,
    generator: torch.Generator,
    result: TrainingResult,
    in_place: bool,
    ranks: Ranks,
) -> tuple[int, int]:
    """(step, epoch) to start from: a matching saved state's, put back into the loop's objects, else 0, 0.
    ``in_place``: into the tensors a captured CUDA graph reads (``restore_state``)."""
    saved = checkpointer.load() if checkpointer is not None else None
    if saved is None:
        return 0, 0
    restore_state(saved, model, optimizers, lookahead, generator, result, in_place=in_place)
    if ranks.is_main:
        print(f"train: resuming from {checkpointer.path} after epoch {saved['epoch']}", flush=True)
    return saved["step"], saved["epoch"]


# --- one epoch -------------------------------------------------------------------------------------------


def _train_epoch(
    step: int,
    x_epoch: torch.Tensor,
    y_train: torch.Tensor,
    order: torch.Tensor,
    schedule: Schedule,
    rates: list[tuple[dict, float]],
    run_step: Step,
    lookahead: Lookahead | None,
    ranks: Ranks,
    bar: tqdm,
) -> tuple[int, int]:
    """The epoch's steps from ``step`` on, batches in ``order``; returns the step reached and images seen."""
    seen = 0
    for batch_index in range(schedule.steps_per_epoch):
        if step >= schedule.total_steps:
            break
        factor = schedule.factor(step)
        for group, base_lr in rates:
            frozen = group.get("role") == "whiten_bias" and step >= schedule.whiten_bias_steps
            set_learning_rate(group, 0.0 if frozen else base_lr * factor)
        size = schedule.batch_size
        idx = ranks.shard(order[batch_index * size : (batch_index + 1) * size])
        run_step(x_epoch[idx], y_train[idx])
        step += 1
        if lookahead is not None and step % LOOKAHEAD_EVERY == 0:
            lookahead.pull(decay=LOOKAHEAD_DECAY**LOOKAHEAD_EVERY * (step / schedule.total_steps) ** 3)
        seen += len(idx) * ranks.world_size
        bar.update(1)
    if lookahead is not None and step >= schedule.total_steps and step >= LOOKAHEAD_EVERY:
        lookahead.pull(decay=1.0)  # finish on the slow weights (once they exist)
    return step, seen


def _epoch_record(
    epoch: int,
    step: int,
    lr: float,
    sums: EpochSums,
    seen: int,
    val_loss: float | None,
    val_acc: float | None,
    seconds: float,
) -> EpochRecord:
    """The history's row for ``epoch`` (0-based here, 1-based in the record) from its summed statistics."""
    return EpochRecord(
        epoch=epoch + 1,
        step=step,
        lr=lr,
        train_loss=sums.loss.item() / max(seen, 1),
        train_accuracy=sums.correct.item() / max(seen, 1),
        val_loss=val_loss,
        val_accuracy=val_acc,
        seconds=seconds,
    )
