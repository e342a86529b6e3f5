"""The optimisers of the training loop: one per update rule, with one parameter group per learning-rate role.

Nesterov SGD (conv nets, on a summed loss), AdamW (transformers), and Muon, orthogonalised momentum for the
conv filter banks (``train.filter_optimizer: muon``); plus the lookahead that pulls the weights towards a
slow average every few steps. ``make_optimizers`` reads from the architecture registry which recipe a
network follows and which of its parameters it treats specially. With ``graph_safe`` the learning rates
are device tensors, so a captured CUDA graph (training/cuda_graphs.py) reads them on every replay.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel

from cifar10_pipeline.core.params import TrainParams
from cifar10_pipeline.modeling.architectures import architecture

# A fixed constant of the recipes, not a param (see training/loop.py's constants).
ADAMW_BETAS = (0.9, 0.98)  # transformer recipes (cifar_vit, fine-tuning)

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
