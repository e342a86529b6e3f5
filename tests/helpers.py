"""Small builders shared by tests (kept out of conftest so they can be imported explicitly)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

from cifar10_pipeline.model import build_cifar_convnet
from cifar10_pipeline.params import TrainParams, resolve

from .conftest import PROJECT_ROOT


def default_raw_params() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def train_params(**changes) -> TrainParams:
    """The committed train section with ``changes`` applied (validated like params.yaml)."""
    raw = copy.deepcopy(default_raw_params())
    raw["train"].update(changes)
    return resolve(raw).train


def tiny_convnet(tta_level: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    model = build_cifar_convnet([16, 32, 32], tta_level=tta_level)
    model.init_whitening(torch.randn(64, 3, 32, 32))
    return model.eval()


def save_tiny_convnet(directory: Path, tta_level: int = 0, seed: int = 0) -> Path:
    tiny_convnet(tta_level, seed).save_pretrained(directory)
    return directory


def write_params(root: Path, **sections: dict) -> None:
    """Rewrite ``root/params.yaml`` with per-section overrides."""
    raw = default_raw_params()
    for section, values in sections.items():
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
