"""The training loop: augmentation, schedule, determinism, and that it actually learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifar10_pipeline.data import ArraySplit
from cifar10_pipeline.stages.train import build_model
from cifar10_pipeline.training import augment, lr_factor, make_optimizer, train_classifier

from .conftest import synthetic_images
from .helpers import train_params


@pytest.fixture(scope="module")
def splits() -> tuple[ArraySplit, ArraySplit]:
    images, labels = synthetic_images(600, seed=5)
    return ArraySplit(images[:500], labels[:500], np.arange(500)), ArraySplit(
        images[500:], labels[500:], np.arange(100)
    )


def small(**changes):
    return train_params(
        **{"widths": [16, 32, 32], "batch_size": 50, "epochs": 4, "whiten_bias_epochs": 1, **changes}
    )


def test_learns_an_easy_task(splits) -> None:
    train, val = splits
    hp = small()
    records = []
    result = train_classifier(
        build_model(hp), train, val, hp, torch.device("cpu"), on_epoch=records.append, progress=False
    )
    assert [r.epoch for r in records] == [1, 2, 3, 4]
    assert result.steps == 40
    assert records[-1].val_accuracy > 0.7  # colour identifies the class (chance: 0.1)
    assert records[-1].train_loss < records[0].train_loss


def test_same_seed_same_weights(splits) -> None:
    train, _ = splits
    hp = small(epochs=1)
    states = []
    for _ in range(2):
        model = build_model(hp)
        train_classifier(model, train, None, hp, torch.device("cpu"), progress=False)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_fractional_epochs_stop_mid_epoch(splits) -> None:
    train, _ = splits
    hp = small(epochs=1.5)
    result = train_classifier(build_model(hp), train, None, hp, torch.device("cpu"), progress=False)
    assert result.steps == 15 and len(result.history) == 2


def test_augment_translates_and_flips() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = augment(x, translate=0, flip_mask=torch.tensor([True, False]), generator=generator)
    torch.testing.assert_close(out[0], x[0].flip(-1))
    torch.testing.assert_close(out[1], x[1])
    shifted = augment(x, translate=2, flip_mask=None, generator=generator)
    assert shifted.shape == x.shape
    assert not torch.equal(shifted, x)  # 1/25 chance per image of no shift; fixed seed makes this stable


def test_schedule_warms_up_then_decays() -> None:
    values = [lr_factor(step, 100, 0.2, 0.1) for step in range(101)]
    assert values[0] == pytest.approx(0.2)
    assert max(values) == pytest.approx(1.0) and values.index(1.0) == 20
    assert values[-1] == pytest.approx(0.1)


def test_norm_biases_get_the_larger_learning_rate() -> None:
    hp = small(extra_convs=1)
    model = build_model(hp)
    bias_group, other_group = make_optimizer(model, hp).param_groups
    assert bias_group["lr"] == pytest.approx(other_group["lr"] * hp.bias_lr_scale)
    norm_params = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in bias_group["params"]} == norm_params  # residual layers' norms included
