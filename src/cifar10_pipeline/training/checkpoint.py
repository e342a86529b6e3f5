"""Resumable training: the loop's whole state saved every ``train.checkpoint_every`` epochs.

A checkpoint holds what the next epoch needs to continue exactly where the last one ended: the weights,
every optimizer's state, the lookahead's slow weights, the random generators and the history so far. On a
CPU the resumed run then reaches the same final weights, bit for bit, as an uninterrupted one.

The checkpoint lives in ``models/checkpoints/train/`` (git- and DVC-ignored scratch space, not a declared
output, so DVC neither deletes it before a re-run nor caches it). It is used only when its fingerprint (the
train params, the processed data and the training code) matches the current run; a stale one is replaced.
The train stage deletes it once the model is saved. What goes into the state, and how it is put back:
training/state.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import cifar10_pipeline
from cifar10_pipeline.core.hashing import file_digest
from cifar10_pipeline.core.params import TrainParams

CHECKPOINT_FILE = "last.pt"
# Source folders whose code decides what a checkpoint's state means.
FINGERPRINTED_CODE = ("training", "modeling")


def fingerprint(hp: TrainParams, data_files: list[Path], world_size: int) -> str:
    """What a checkpoint must have been made with to be resumed: params, data bytes, code, process count."""
    package = Path(cifar10_pipeline.__file__).parent
    parts: dict[str, Any] = {
        "params": hp.model_dump(mode="json", exclude={"resume", "checkpoint_every"}),
        "world_size": world_size,
        "data": {Path(f).name: file_digest(Path(f)) for f in data_files},
        "code": {
            str(f.relative_to(package)): file_digest(f)
            for folder in FINGERPRINTED_CODE
            for f in sorted((package / folder).rglob("*.py"))
        },
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Checkpointer:
    """Where and how often the loop saves its state, and which state it may resume from."""

    directory: Path
    every_epochs: int  # 0: never save
    fingerprint: str
    resume: bool = True

    @property
    def path(self) -> Path:
        return Path(self.directory) / CHECKPOINT_FILE

    def due(self, epoch: int, last_epoch: int) -> bool:
        """Save after ``epoch`` (1-based)? Never after the last one: the model itself is saved then."""
        return self.every_epochs > 0 and epoch % self.every_epochs == 0 and epoch < last_epoch

    def save(self, state: dict[str, Any]) -> None:
        """Write atomically: a kill mid-write leaves the previous checkpoint, never a torn one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_suffix(".pt.partial")
        torch.save({"fingerprint": self.fingerprint, **state}, staged)
        with open(staged, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staged, self.path)

    def load(self) -> dict[str, Any] | None:
        """The saved state if resuming is asked for and it was made by this very run's setup, else None."""
        if not self.resume or not self.path.is_file():
            return None
        # weights_only: tensors, numbers and strings only; nothing in the file can run code when read.
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            print(
                f"train: ignoring {self.path}: it was made with other params, data or code "
                f"(it will be replaced)",
                flush=True,
            )
            return None
        return state

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_suffix(".pt.partial").unlink(missing_ok=True)
