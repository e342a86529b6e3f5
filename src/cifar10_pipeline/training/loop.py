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

Under torchrun (training/distributed.py) every rank walks the same augmented epoch in the same order and
trains on its shard of each global batch; DDP averages the gradients. ``train.checkpoint_every`` saves the
loop's whole state after every N epochs (training/checkpoint.py) and a re-run resumes from it.

On a GPU, ``cuda_graphs`` records the whole step (forward, backward, optimizer, statistics) once as a CUDA
graph and replays it: per step the CPU only copies the batch in, so a small network is no longer limited by
Python and kernel-launch overhead, and nothing has to be compiled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cifar10_pipeline.core.data import ArraySplit
from cifar10_pipeline.core.device import synchronize
from cifar10_pipeline.core.params import TrainParams
from cifar10_pipeline.modeling.architectures import architecture
from cifar10_pipeline.modeling.inference import autocast, fit_input_size, normalize, tta_logits
from cifar10_pipeline.training import distributed
from cifar10_pipeline.training.checkpoint import Checkpointer, history_to_state
from cifar10_pipeline.training.distributed import Ranks

# Fixed constants of the recipes, not params: they change results, but no profile has needed another value
# and none was tuned here (they are the airbench recipe's). Changing one is a code change, and dvc.yaml's
# training/ dep re-runs the train stage when it happens.
LOOKAHEAD_EVERY = 5  # steps between lookahead pulls
LOOKAHEAD_DECAY = 0.95  # per-step weight of the slow average (raised to the pull period, scaled by progress)
WARMUP_START = 0.2  # the learning rate's fraction at step 0, ramped to 1 over train.warmup_fraction
WHITENING_SAMPLE = 5000  # training images whose patch covariance initialises the whitening layer
ADAMW_BETAS = (0.9, 0.98)  # transformer recipes (cifar_vit, fine-tuning)
# Eager steps before capture. One is enough: lazy state (momentum buffers), cuDNN's algorithm choice and any
# compilation all happen on the first call, so the captured second call is the steady state.
GRAPH_WARMUP_STEPS = 1


@dataclass
class EpochRecord:
    epoch: int
    step: int
    lr: float
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float


@dataclass
class TrainingResult:
    history: list[EpochRecord] = field(default_factory=list)
    train_seconds: float = 0.0  # device-synchronised time of the training loop (validation passes excluded)
    steps: int = 0
    images_seen: int = 0


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


# Quintic Newton-Schulz coefficients from Jordan's description of Muon (2024): the steepest slope at 0, so a
# few iterations lift even small singular values close to 1 (to roughly 0.5-1.5, not exactly 1).
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalise(matrices: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximately the nearest semi-orthogonal matrix (singular values ~1), in bf16, by Newton-Schulz.

    Takes one (m, n) matrix or a batch (b, m, n) of them. Each iteration is three batched matmuls, the
    polynomial's scalings fused into them (``baddbmm``): one small kernel where eager code would launch
    three, which is what a step of this small network is short of.
    """
    x = matrices.bfloat16()
    single = x.ndim == 2
    x = x[None] if single else x
    wide = x.shape[-2] <= x.shape[-1]
    x = x if wide else x.mT  # iterate on the smaller Gram matrix
    # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*G + c*G@G
        x = torch.baddbmm(x, polynomial, x, beta=a)  # a*X + (b*G + c*G@G) @ X
    x = x if wide else x.mT
    return x[0] if single else x


class Muon(torch.optim.Optimizer):
    """Orthogonalised momentum for conv filter banks (Muon, as described by Jordan 2024 for CIFAR-10).

    Each step takes Nesterov momentum of the raw gradient, flattens it to (out_channels, in_channels*k*k)
    and replaces it with its orthogonalised version, so every direction of the filter bank moves by about
    the same amount. Batch norm after every conv makes the filters' scale irrelevant, so each bank is
    first reset to a fixed norm (sqrt(out_channels)): its step size then stays what ``lr`` says.
    ``torch.optim.Muon`` takes 2-D parameters only and has no such reset. ``lr`` may be a device tensor
    (read by a captured CUDA graph).

    Banks of the same shape are orthogonalised together as one batch and the elementwise work runs as
    ``torch._foreach`` ops: a few dozen kernels per step instead of a few hundred.
    """

    def __init__(self, params: list[dict], momentum: float, ns_steps: int = 3):
        super().__init__(params, {"momentum": momentum, "ns_steps": ns_steps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            momentum = group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = []
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                buffers.append(self.state[p]["momentum_buffer"])
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads)
            nesterov = torch._foreach_add(grads, buffers, alpha=momentum)
            scales = torch._foreach_reciprocal(torch._foreach_norm(params))
            torch._foreach_mul_(scales, [math.sqrt(p.shape[0]) for p in params])
            torch._foreach_mul_(params, scales)
            by_shape: dict[tuple[int, int], list[int]] = {}
            for index, p in enumerate(params):
                by_shape.setdefault((p.shape[0], p[0].numel()), []).append(index)
            for indices in by_shape.values():
                stacked = torch.stack([nesterov[i].flatten(1) for i in indices])
                # In fp32: a bf16 product would round a tensor learning rate to bf16 (0.4% off).
                updates = orthogonalise(stacked, group["ns_steps"]).float().mul_(group["lr"])
                torch._foreach_sub_(
                    [params[i] for i in indices],
                    [update.view_as(params[i]) for i, update in zip(indices, updates, strict=True)],
                )


def make_optimizers(
    model: PreTrainedModel, hp: TrainParams, graph_safe: bool = False
) -> list[torch.optim.Optimizer]:
    """Optimizers (one per update rule) with one parameter group per learning-rate role.

    ``graph_safe`` gives fused kernels and tensor learning rates that live on the device: a captured CUDA
    graph reads the rate from that tensor, so changing it between replays needs no re-capture.
    """
    device = next(model.parameters()).device
    spec = architecture(hp.model)
    spec.check_model(model)
    spec.check_params(hp)

    def rate(value: float) -> float | torch.Tensor:
        return torch.tensor(value, device=device) if graph_safe else value

    trainable = [p for p in model.parameters() if p.requires_grad]
    # The data-initialised first layer's bias trains for a while, then its rate drops to 0 (train_classifier).
    whiten_ids = {id(p) for p in spec.data_initialised_bias(model)}
    whiten_bias = [p for p in trainable if id(p) in whiten_ids]
    trainable = [p for p in trainable if id(p) not in whiten_ids]
    if spec.recipe.name == "adamw":
        # No weight decay on biases, norms and position embeddings (the usual transformer practice).
        decayed = [p for p in trainable if p.ndim >= 2 and p.shape[0] > 1]
        rest = [p for p in trainable if not (p.ndim >= 2 and p.shape[0] > 1)] + whiten_bias
        groups = [
            {
                "params": decayed,
                "lr": rate(hp.adamw_lr),
                "weight_decay": hp.adamw_weight_decay,
                "role": "weights",
            },
            {"params": rest, "lr": rate(hp.adamw_lr), "weight_decay": 0.0, "role": "no_decay"},
        ]
        groups = [g for g in groups if g["params"]]
        return [torch.optim.AdamW(groups, betas=ADAMW_BETAS, fused=graph_safe or None, capturable=graph_safe)]
    # hp.lr and hp.weight_decay are per 1024 examples of *summed* loss and decoupled from each other;
    # translate them to torch's SGD, whose weight decay is multiplied by the learning rate.
    kilostep_scale = 1024 * (1 + 1 / (1 - hp.momentum))
    lr = hp.lr / kilostep_scale
    wd = hp.weight_decay * hp.batch_size / kilostep_scale
    lr_biases = lr * hp.bias_lr_scale
    lr_head = lr * hp.head_lr_scale
    # Identify batch-norm parameters by module type, not by name, so any layout of the groups works.
    norm_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    head_ids = {id(p) for p in spec.head(model)}
    norm_biases = [p for p in trainable if id(p) in norm_ids]
    head = [p for p in trainable if id(p) in head_ids]
    others = [p for p in trainable if id(p) not in norm_ids | head_ids]
    # Under Muon the conv filter banks leave SGD; the head, biases and whitening bias stay.
    filter_ids = {id(p) for p in others if p.ndim == 4} if hp.filter_optimizer == "muon" else set()
    filters = [p for p in others if id(p) in filter_ids]
    others = [p for p in others if id(p) not in filter_ids]
    groups = [
        {"params": norm_biases, "lr": rate(lr_biases), "weight_decay": wd / lr_biases, "role": "norm_biases"},
        {"params": others, "lr": rate(lr), "weight_decay": wd / lr, "role": "weights"},
        {"params": head, "lr": rate(lr_head), "weight_decay": wd / lr_head, "role": "head"},
        {"params": whiten_bias, "lr": rate(lr), "weight_decay": wd / lr, "role": "whiten_bias"},
    ]
    groups = [g for g in groups if g["params"]]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.SGD(groups, momentum=hp.momentum, nesterov=True, fused=graph_safe or None)
    ]
    if filters:
        filter_group = {"params": filters, "lr": rate(hp.muon_lr), "role": "filters"}
        optimizers.append(Muon([filter_group], momentum=hp.muon_momentum))
    return optimizers


def param_groups(optimizers: list[torch.optim.Optimizer]) -> list[dict]:
    return [group for optimizer in optimizers for group in optimizer.param_groups]


def set_learning_rate(group: dict, value: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)  # in place: a captured graph keeps reading this tensor
    else:
        group["lr"] = value


class Lookahead:
    """Every few steps, move a slow copy of the weights towards the fast ones and restart from it.

    The pull's weight is a tensor, so the pull can be captured as a CUDA graph and replayed with new weights.
    """

    def __init__(self, model: torch.nn.Module):
        self.fast = [v for v in model.state_dict().values() if v.is_floating_point()]
        self.slow = [v.detach().clone() for v in self.fast]
        self.weight = torch.zeros((), device=self.fast[0].device)
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def _pull(self) -> None:
        for fast, slow in zip(self.fast, self.slow, strict=True):
            slow.lerp_(fast, self.weight)
            fast.copy_(slow)

    def capture(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._pull()

    def pull(self, decay: float) -> None:
        self.weight.fill_(1 - decay)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._pull()


class CapturedStep:
    """A training step recorded once as a CUDA graph; calling it copies the batch in and replays the graph.

    The step must read its batch from, and only from, the static ``x``/``y`` tensors. The warm-up steps that
    precede the capture change the model and the optimizer; both are put back afterwards, so training starts
    from exactly the state it would have had without the capture.
    """

    def __init__(
        self,
        step: Callable[[torch.Tensor, torch.Tensor], None],
        example_x: torch.Tensor,
        example_y: torch.Tensor,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
    ):
        self.x = example_x.clone().contiguous(memory_format=torch.channels_last)
        self.y = example_y.clone()
        initial_state = {k: v.clone() for k, v in model.state_dict().items()}
        side = torch.cuda.Stream(self.x.device)
        side.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                step(self.x, self.y)
        torch.cuda.current_stream(self.x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step(self.x, self.y)
        with torch.no_grad():
            for key, value in model.state_dict().items():
                value.copy_(initial_state[key])
            # Zeroed momentum / moment estimates and step counts make the next step a first step.
            for optimizer in optimizers:
                for state in optimizer.state.values():
                    for value in state.values():
                        if isinstance(value, torch.Tensor):
                            value.zero_()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()


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


def capture_state(
    epoch: int,
    step: int,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    lookahead: Lookahead | None,
    generator: torch.Generator,
    result: TrainingResult,
) -> dict:
    """Everything the next epoch reads, on the CPU: see training/checkpoint.py."""

    def cpu(value):
        return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value

    return {
        "epoch": epoch,
        "step": step,
        "model": {k: cpu(v) for k, v in model.state_dict().items()},
        "optimizers": [
            {
                "state": {i: {k: cpu(v) for k, v in s.items()} for i, s in enumerate(_states(opt))},
            }
            for opt in optimizers
        ],
        "lookahead": [cpu(v) for v in lookahead.slow] if lookahead is not None else None,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": history_to_state(result.history),
        "train_seconds": result.train_seconds,
        "images_seen": result.images_seen,
    }


def _states(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter's optimizer state, in parameter order (empty before its first step)."""
    return [optimizer.state.get(p, {}) for g in optimizer.param_groups for p in g["params"]]


@torch.no_grad()
def restore_state(
    saved: dict,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    lookahead: Lookahead | None,
    generator: torch.Generator,
    result: TrainingResult,
    in_place: bool,
) -> None:
    """Put a captured state back. ``in_place``: copy into the existing tensors, which a captured CUDA graph
    reads by address (creating new ones would leave the graph updating the old)."""
    for key, value in model.state_dict().items():
        value.copy_(saved["model"][key])
    for optimizer, saved_optimizer in zip(optimizers, saved["optimizers"], strict=True):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for index, param in enumerate(params):
            for key, value in saved_optimizer["state"].get(index, {}).items():
                current = optimizer.state[param].get(key)
                if in_place and isinstance(current, torch.Tensor):
                    current.copy_(value)
                elif isinstance(value, torch.Tensor) and key != "step":
                    optimizer.state[param][key] = value.to(param.device)
                else:
                    optimizer.state[param][key] = value  # eager AdamW keeps its step count on the CPU
    if lookahead is not None:
        for slow, value in zip(lookahead.slow, saved["lookahead"], strict=True):
            slow.copy_(value)
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    result.history = [EpochRecord(**record) for record in saved["history"]]
    result.train_seconds = saved["train_seconds"]
    result.images_seen = saved["images_seen"]


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
    ranks = ranks or Ranks()
    generator = torch.Generator().manual_seed(hp.seed)
    model.to(device=device, memory_format=torch.channels_last).train()
    cfg = model.config
    x_train = normalize(torch.as_tensor(train.images).to(device), cfg.image_mean, cfg.image_std)
    y_train = torch.as_tensor(train.labels).to(device)
    if val is not None and len(val):
        x_val = normalize(torch.as_tensor(val.images).to(device), cfg.image_mean, cfg.image_std)
        y_val = torch.as_tensor(val.labels).to(device)
    spec = architecture(hp.model)
    spec.check_model(model)
    if spec.init_from_data is not None:
        spec.init_from_data(model, x_train[:WHITENING_SAMPLE])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once

    batch_size = min(hp.batch_size, len(x_train))
    if batch_size % ranks.world_size:
        raise ValueError(
            f"train.batch_size ({batch_size}) is the global batch and must divide evenly between the "
            f"{ranks.world_size} processes (train.nproc or torchrun's process count); pick a multiple"
        )
    steps_per_epoch = len(x_train) // batch_size  # the last partial batch is dropped: constant shapes
    total_steps = max(1, math.ceil(hp.epochs * steps_per_epoch))
    whiten_bias_steps = math.ceil(hp.whiten_bias_epochs * steps_per_epoch)
    # A captured graph would have to hold DDP's all-reduce as well: several processes run eagerly.
    graphs = hp.cuda_graphs and device.type == "cuda" and not ranks.distributed
    if hp.cuda_graphs and ranks.distributed and ranks.is_main:
        print("train: cuda_graphs is ignored with several processes (DDP runs the step eagerly)", flush=True)
    optimizers = make_optimizers(model, hp, graph_safe=graphs)
    groups = param_groups(optimizers)
    base_lrs = [float(group["lr"]) for group in groups]
    reported_lr = next(float(g["lr"]) for g in groups if g["role"] in ("weights", "filters"))
    lookahead = Lookahead(model) if (hp.lookahead and spec.recipe.lookahead) else None
    forward: torch.nn.Module = model
    if ranks.distributed:
        # Built after the data-dependent init: DDP copies rank 0's weights and buffers to every rank.
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = torch.compile(forward, mode=hp.compile) if hp.compile else forward
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)

    def train_step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        with autocast(device, hp.precision):
            logits = forward(pixel_values=fit_input_size(xb, cfg.image_size)).logits.float()
        losses = F.cross_entropy(logits, yb, label_smoothing=hp.label_smoothing, reduction="none")
        # DDP averages gradients over ranks: a summed loss is scaled back up to the global batch's sum.
        loss = losses.sum() * ranks.world_size if spec.recipe.summed_loss else losses.mean()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        with torch.no_grad():
            loss_sum.add_(losses.sum())
            correct.add_((logits.argmax(1) == yb).sum())

    run_step: Callable[[torch.Tensor, torch.Tensor], None] = train_step
    if graphs:
        run_step = CapturedStep(train_step, x_train[:batch_size], y_train[:batch_size], model, optimizers)
        if lookahead is not None:
            lookahead.capture()
    # First-epoch flips are random; after that each image flips on every other epoch, so the network
    # sees both orientations of every image every two epochs (less variance than independent coin tosses).
    first_flips = torch.rand(len(x_train), generator=generator).lt(0.5).to(device)

    result = TrainingResult()
    step = 0
    first_epoch = 0
    last_epoch = math.ceil(total_steps / steps_per_epoch)
    saved = checkpointer.load() if checkpointer is not None else None
    if saved is not None:
        step, first_epoch = saved["step"], saved["epoch"]
        restore_state(saved, model, optimizers, lookahead, generator, result, in_place=graphs)
        if ranks.is_main:
            print(f"train: resuming from {checkpointer.path} after epoch {first_epoch}", flush=True)
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not (progress and ranks.is_main),
        mininterval=1.0,
    )
    validate = val is not None and len(val) and ranks.is_main
    for epoch in range(first_epoch, last_epoch):
        synchronize(device)
        epoch_start = time.perf_counter()
        flips = (first_flips ^ bool(epoch % 2)) if hp.flip else None
        x_epoch = augment(x_train, hp.translate, flips, generator, hp.cutout)
        order = torch.randperm(len(x_train), generator=generator).to(device)
        loss_sum.zero_()
        correct.zero_()
        seen = 0
        for batch_index in range(steps_per_epoch):
            if step >= total_steps:
                break
            factor = lr_factor(step, total_steps, hp.warmup_fraction, hp.final_lr_fraction)
            for group, base_lr in zip(groups, base_lrs, strict=True):
                frozen = group.get("role") == "whiten_bias" and step >= whiten_bias_steps
                set_learning_rate(group, 0.0 if frozen else base_lr * factor)
            idx = ranks.shard(order[batch_index * batch_size : (batch_index + 1) * batch_size])
            run_step(x_epoch[idx], y_train[idx])
            step += 1
            if lookahead is not None and step % LOOKAHEAD_EVERY == 0:
                lookahead.pull(decay=LOOKAHEAD_DECAY**LOOKAHEAD_EVERY * (step / total_steps) ** 3)
            seen += len(idx) * ranks.world_size
            bar.update(1)
        if lookahead is not None and step >= total_steps and step >= LOOKAHEAD_EVERY:
            lookahead.pull(decay=1.0)  # finish on the slow weights (once they exist)
        synchronize(device)
        epoch_seconds = time.perf_counter() - epoch_start
        result.train_seconds += epoch_seconds
        result.images_seen += seen
        distributed.all_reduce_sum(loss_sum, correct)  # the whole batch's statistics, not this shard's
        val_loss = val_acc = None
        if validate:
            val_loss, val_acc = evaluate_normalised(model, x_val, y_val, hp.precision)
        record = EpochRecord(
            epoch=epoch + 1,
            step=step,
            lr=reported_lr * lr_factor(step, total_steps, hp.warmup_fraction, hp.final_lr_fraction),
            train_loss=loss_sum.item() / max(seen, 1),
            train_accuracy=correct.item() / max(seen, 1),
            val_loss=val_loss,
            val_accuracy=val_acc,
            seconds=epoch_seconds,
        )
        result.history.append(record)
        bar.set_postfix(
            loss=f"{record.train_loss:.3f}", val_acc=f"{val_acc:.4f}" if val_acc is not None else "-"
        )
        if on_epoch is not None:
            on_epoch(record)
        if checkpointer is not None and checkpointer.due(epoch + 1, last_epoch) and ranks.is_main:
            checkpointer.save(capture_state(epoch + 1, step, model, optimizers, lookahead, generator, result))
    bar.close()
    result.steps = step
    model.eval()
    return result
