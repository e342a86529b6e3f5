"""The training loop's state: what it has reported so far, and everything the next epoch reads.

``capture_state`` copies that state to the CPU after an epoch (the weights, every optimizer's state, the
lookahead's slow weights, the random generators and the history so far); training/checkpoint.py saves it,
and ``restore_state`` puts it back so that a resumed run continues exactly where the saved one ended.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cifar10_pipeline.training.optim import Lookahead


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


def capture_state(
    epoch: int,
    step: int,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    lookahead: Lookahead | None,
    generator: torch.Generator,
    result: TrainingResult,
) -> dict:
    """Everything the next epoch reads, on the CPU (saved by training/checkpoint.py)."""

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


def history_to_state(history: list[Any]) -> list[dict[str, Any]]:
    return [asdict(record) for record in history]
