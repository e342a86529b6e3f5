"""Resumable training (training/checkpoint.py): a run stopped after an epoch and resumed from its checkpoint
ends with the very weights of an uninterrupted run on the CPU; a checkpoint of another setup is not used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cifar10_pipeline.modeling.architectures import build_model
from cifar10_pipeline.training.checkpoint import Checkpointer, fingerprint
from cifar10_pipeline.training.loop import train_classifier
from cifar10_pipeline.training.state import EpochRecord

from ..conftest import synthetic_images
from ..integration.test_train_stage import write_processed
from ..support.helpers import train_params

TINY = {"widths": [8, 16, 16], "epochs": 4, "batch_size": 50, "device": "cpu", "tta_level": 0, "seed": 3}


class Interrupted(Exception):
    pass


def fit(hp, checkpointer: Checkpointer | None, stop_after_epoch: int | None = None) -> dict:
    from cifar10_pipeline.core.data import ArraySplit

    images, labels = synthetic_images(260, seed=5)
    train = ArraySplit(images[:200], labels[:200], torch.arange(200).numpy())
    val = ArraySplit(images[200:], labels[200:], torch.arange(60).numpy())
    torch.manual_seed(hp.seed)
    model = build_model(hp)

    def on_epoch(record: EpochRecord) -> None:
        if record.epoch == stop_after_epoch:
            raise Interrupted  # the checkpoint of this epoch is not written: the previous one is resumed

    history = train_classifier(
        model, train, val, hp, torch.device("cpu"), on_epoch, progress=False, checkpointer=checkpointer
    ).history
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "history": history}


def checkpointer(directory: Path, hp, every: int = 1, tag: str = "setup") -> Checkpointer:
    return Checkpointer(directory, every, fingerprint=tag, resume=True)


@pytest.mark.reliability(
    "training stopped after epoch 3 of 4, then run again with checkpoint_every: 1",
    "resumes after epoch 2 and ends with weights equal, bit for bit, to an uninterrupted run's",
)
@pytest.mark.slow
def test_resumed_training_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    hp = train_params(**TINY, checkpoint_every=1)
    uninterrupted = fit(hp, None)

    saver = checkpointer(tmp_path, hp)
    with pytest.raises(Interrupted):
        fit(hp, saver, stop_after_epoch=3)
    assert torch.load(saver.path, weights_only=True)["epoch"] == 2
    resumed = fit(hp, saver)

    assert uninterrupted["state"].keys() == resumed["state"].keys()
    for key, value in uninterrupted["state"].items():
        assert torch.equal(value, resumed["state"][key]), key
    assert [r.val_loss for r in resumed["history"]] == [r.val_loss for r in uninterrupted["history"]]
    assert [r.epoch for r in resumed["history"]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_checkpoint_of_another_setup_is_not_resumed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hp = train_params(**TINY, checkpoint_every=1)
    with pytest.raises(Interrupted):
        fit(hp, checkpointer(tmp_path, hp, tag="old params"), stop_after_epoch=3)
    fresh = fit(hp, checkpointer(tmp_path, hp, tag="new params"))
    assert "ignoring" in capsys.readouterr().out
    uninterrupted = fit(hp, None)
    assert all(torch.equal(v, fresh["state"][k]) for k, v in uninterrupted["state"].items())


@pytest.mark.slow
def test_resume_false_starts_over(tmp_path: Path) -> None:
    hp = train_params(**TINY, checkpoint_every=1)
    with pytest.raises(Interrupted):
        fit(hp, checkpointer(tmp_path, hp), stop_after_epoch=2)
    assert Checkpointer(tmp_path, 1, "setup", resume=False).load() is None
    assert Checkpointer(tmp_path, 1, "setup", resume=True).load()["epoch"] == 1


def test_no_checkpoint_after_the_last_epoch_and_none_when_off(tmp_path: Path) -> None:
    saver = Checkpointer(tmp_path, 2, "x")
    assert [e for e in range(1, 7) if saver.due(e, last_epoch=6)] == [2, 4]
    assert not any(Checkpointer(tmp_path, 0, "x").due(e, 6) for e in range(1, 7))


def test_the_fingerprint_follows_params_and_data_but_not_the_checkpoint_knobs(tmp_path: Path) -> None:
    write_processed(tmp_path, train_size=100, val_size=20)
    files = [tmp_path / "data/processed/train.npz", tmp_path / "data/processed/val.npz"]
    base = fingerprint(train_params(**TINY), files, world_size=1)
    assert fingerprint(train_params(**TINY, checkpoint_every=5, resume=False), files, 1) == base
    assert fingerprint(train_params(**{**TINY, "epochs": 5}), files, 1) != base
    assert fingerprint(train_params(**TINY), files, world_size=2) != base
    files[1].write_bytes(files[1].read_bytes() + b"\0")
    assert fingerprint(train_params(**TINY), files, 1) != base
