"""The training loop: augmentation, schedule, determinism, and that it actually learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifar10_pipeline.core.data import ArraySplit
from cifar10_pipeline.modeling.architectures import build_model
from cifar10_pipeline.training.loop import augment, lr_factor, train_classifier
from cifar10_pipeline.training.optim import Muon, make_optimizers, orthogonalise

from ..conftest import synthetic_images
from ..support.helpers import train_params


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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_translation_moves_each_image_by_its_own_shift() -> None:
    """The one-gather translation equals cropping each reflect-padded image at its own drawn offset."""
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last)
    out = augment(x, translate=2, flip_mask=None, generator=torch.Generator().manual_seed(0))
    shifts = torch.randint(0, 5, (2, 6), generator=torch.Generator().manual_seed(0))  # the same draw
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i, (dy, dx) in enumerate(shifts.T.tolist()):
        torch.testing.assert_close(out[i], padded[i, :, dy : dy + 8, dx : dx + 8], rtol=0, atol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert len({tuple(s) for s in shifts.T.tolist()}) > 1  # several different shifts were exercised


def test_schedule_warms_up_then_decays() -> None:
    values = [lr_factor(step, 100, 0.2, 0.1) for step in range(101)]
    assert values[0] == pytest.approx(0.2)
    assert max(values) == pytest.approx(1.0) and values.index(1.0) == 20
    assert values[-1] == pytest.approx(0.1)


def test_norm_biases_get_the_larger_learning_rate() -> None:
    hp = small(extra_convs=1)
    model = build_model(hp)
    (sgd,) = make_optimizers(model, hp)
    bias_group, other_group, head_group, whiten_group = sgd.param_groups
    assert bias_group["lr"] == pytest.approx(other_group["lr"] * hp.bias_lr_scale)
    assert head_group["params"] == [model.classifier.weight]
    assert head_group["lr"] == pytest.approx(other_group["lr"] * hp.head_lr_scale)
    norm_params = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in bias_group["params"]} == norm_params  # residual layers' norms included
    assert whiten_group["params"] == [model.whiten.bias] and whiten_group["lr"] == other_group["lr"]


def test_whitening_bias_freezes_after_its_epochs(splits) -> None:
    train, _ = splits
    hp = small(epochs=2, whiten_bias_epochs=1)
    frozen_model = build_model(hp)
    snapshots = []
    train_classifier(
        frozen_model,
        train,
        None,
        hp,
        torch.device("cpu"),
        progress=False,
        on_epoch=lambda _: snapshots.append(frozen_model.whiten.bias.detach().clone()),
    )
    assert not torch.equal(snapshots[0], torch.zeros_like(snapshots[0]))  # it trained in epoch 1
    torch.testing.assert_close(snapshots[1], snapshots[0], rtol=0, atol=0)  # and not in epoch 2


def test_cutout_blanks_one_clipped_square_per_image() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.ones(64, 3, 32, 32)
    out = augment(x, translate=0, flip_mask=None, generator=generator, cutout=8)
    blanked = (out == 0).all(dim=1)  # (N, H, W): all channels zeroed together
    assert ((out == 0) == blanked[:, None]).all()
    areas = blanked.sum(dim=(1, 2))
    assert areas.max() == 64 and areas.min() >= 16  # a full 8x8 square, or one clipped by a corner
    rows, cols = blanked.any(dim=2), blanked.any(dim=1)
    assert (blanked.sum(dim=(1, 2)) == rows.sum(1) * cols.sum(1)).all()  # each blank is one rectangle


def test_transformers_train_with_adamw_and_no_decay_on_norms() -> None:
    hp = small(model="cifar_vit", vit_dim=32, vit_depth=1, vit_heads=2)
    model = build_model(hp)
    (optimizer,) = make_optimizers(model, hp)
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, undecayed = optimizer.param_groups
    assert decayed["weight_decay"] == hp.adamw_weight_decay and undecayed["weight_decay"] == 0.0
    no_decay = {id(p) for p in undecayed["params"]}
    assert id(model.position_embeddings) in no_decay and id(model.norm.weight) in no_decay
    assert id(model.classifier.weight) not in no_decay


@pytest.mark.slow  # ~100 s on one CPU core
def test_vit_learns_an_easy_task(splits) -> None:
    train, val = splits
    hp = small(model="cifar_vit", vit_dim=32, vit_depth=2, vit_heads=2, adamw_lr=3e-3, epochs=6)
    records = []
    train_classifier(
        build_model(hp), train, val, hp, torch.device("cpu"), on_epoch=records.append, progress=False
    )
    assert records[-1].val_accuracy > 0.7  # colour identifies the class (chance: 0.1)


@pytest.mark.parametrize("shape", [(16, 144), (144, 16), (32, 32)])
def test_orthogonalise_flattens_the_singular_values(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    # A badly conditioned matrix: singular values spread over two orders of magnitude.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=generator))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=generator))
    k = min(shape)
    spread = torch.logspace(0, -2, k)
    matrix = u[:, :k] @ torch.diag(spread) @ v[:, :k].T
    out = orthogonalise(matrix, steps=5)
    assert out.shape == matrix.shape and out.dtype == torch.bfloat16
    singular = torch.linalg.svdvals(out.float())
    assert singular.max() < 1.3 and singular.min() > 0.3  # was 100:1, now within a factor of ~4


def test_muon_takes_the_conv_filters_and_sgd_the_rest() -> None:
    hp = small(filter_optimizer="muon", extra_convs=1)
    model = build_model(hp)
    sgd, muon = make_optimizers(model, hp)
    assert isinstance(sgd, torch.optim.SGD) and isinstance(muon, Muon)
    filters = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad
    }
    assert {id(p) for p in muon.param_groups[0]["params"]} == filters
    assert id(model.whiten.weight) not in filters  # the frozen whitening layer stays out
    sgd_params = {id(p) for group in sgd.param_groups for p in group["params"]}
    assert id(model.classifier.weight) in sgd_params and id(model.whiten.bias) in sgd_params
    assert not sgd_params & filters
    assert [g["role"] for g in sgd.param_groups] == ["norm_biases", "head", "whiten_bias"]


def test_muon_resets_each_filter_bank_to_a_fixed_norm() -> None:
    weight = torch.nn.Parameter(10 * torch.randn(8, 4, 3, 3))
    weight.grad = torch.randn_like(weight)
    optimizer = Muon([{"params": [weight], "lr": 0.0}], momentum=0.6)
    optimizer.step()
    assert weight.norm().item() == pytest.approx(8**0.5, rel=1e-5)  # scale-free under batch norm
    optimizer.param_groups[0]["lr"] = torch.tensor(0.1)  # a device-tensor rate, as under CUDA graphs
    before = weight.detach().clone()
    optimizer.step()
    step = (weight.detach() - before).flatten(1)
    singular = torch.linalg.svdvals(step / 0.1)
    assert singular.max() < 1.3 and singular.min() > 0.3  # an orthogonalised update of size lr


def test_muon_batches_same_shaped_banks_without_mixing_them() -> None:
    """Banks of one shape are orthogonalised as one batch: each must still get its own update."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (8, 4, 3, 3), (16, 8, 3, 3)]
    weights = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    alone = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    together = Muon([{"params": weights, "lr": 0.1}], momentum=0.6)
    separate = [Muon([{"params": [w], "lr": 0.1}], momentum=0.6) for w in alone]
    for _ in range(2):
        for w, a, g in zip(weights, alone, grads, strict=True):
            w.grad, a.grad = g.clone(), g.clone()
        together.step()
        for optimizer in separate:
            optimizer.step()
    for w, a in zip(weights, alone, strict=True):
        torch.testing.assert_close(w, a, rtol=0, atol=1e-6)
    assert not torch.allclose(weights[0], weights[1])  # same shape, different gradients, different steps


@pytest.mark.slow
def test_muon_recipe_learns_an_easy_task(splits) -> None:
    train, val = splits
    hp = small(filter_optimizer="muon", lookahead=False, warmup_fraction=0.0, final_lr_fraction=0.0)
    records = []
    train_classifier(
        build_model(hp), train, val, hp, torch.device("cpu"), on_epoch=records.append, progress=False
    )
    assert records[-1].val_accuracy > 0.8  # colour identifies the class (chance: 0.1)


def test_model_card_names_muon_when_it_updated_the_filters() -> None:
    from cifar10_pipeline.reporting.templating import template_environment

    say = template_environment().get_template("model_card_sentences.md.j2").module  # the card's macros
    assert "Muon" not in say.optimiser_rows(small(), "speed_run")
    rows = say.optimiser_rows(small(filter_optimizer="muon", muon_lr=0.3), "speed_run")
    assert "| conv filters | Muon" in rows and "learning rate 0.3" in rows
