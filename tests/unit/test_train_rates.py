"""train.json's images/s after the first epoch (the first pays for torch.compile and the CUDA-graph
capture): from the history, not the first epoch's time."""

from __future__ import annotations

from cifar10_pipeline.stages.train import _rate_after_first_epoch
from cifar10_pipeline.training.state import EpochRecord, TrainingResult


def _epoch(epoch: int, step: int, seconds: float) -> EpochRecord:
    return EpochRecord(epoch, step, 0.1, 1.0, 0.5, None, None, seconds)


def test_rate_leaves_out_the_first_epoch() -> None:
    # 10 steps of 100 images an epoch; the first epoch took 50 s (compiling), the next two 2 s each.
    result = TrainingResult([_epoch(1, 10, 50.0), _epoch(2, 20, 2.0), _epoch(3, 30, 2.0)], 54.0, 30, 3000)
    assert _rate_after_first_epoch(result, 1000) == 500.0


def test_a_single_epoch_has_no_rate_after_it() -> None:
    assert _rate_after_first_epoch(TrainingResult([_epoch(1, 10, 5.0)], 5.0, 10, 1000), 1000) is None
