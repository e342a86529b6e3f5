"""Selective test-time augmentation: the TTA views only for images below a confidence threshold fitted on
held-out images, the same for an image whatever batch it comes in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifar10_pipeline.modeling.inference import (
    fit_selective_tta,
    fit_tta_confidence,
    normalize,
    plain_confidence,
    predict_logits,
    set_tta_confidence,
    tta_confidence,
    tta_logits,
)

from ..conftest import synthetic_images
from ..support.helpers import tiny_convnet


@pytest.fixture(scope="module")
def model_and_images():
    model = tiny_convnet(tta_level=2)
    images, labels = synthetic_images(40, seed=3)
    x = normalize(torch.as_tensor(images), model.config.image_mean, model.config.image_std)
    return model, images, labels, x


@torch.no_grad()
def test_each_image_gets_either_its_plain_or_its_full_tta_logits(model_and_images) -> None:
    model, _, _, x = model_and_images
    plain, full = tta_logits(model, x, 0), tta_logits(model, x, 2)
    confidence = plain_confidence(plain)
    threshold = float(confidence.median())
    selective = tta_logits(model, x, 2, threshold)
    uncertain = confidence < threshold
    assert 0 < int(uncertain.sum()) < len(x)
    torch.testing.assert_close(selective[uncertain], full[uncertain], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(selective[~uncertain], plain[~uncertain], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_choice_does_not_depend_on_the_batch(model_and_images) -> None:
    model, _, _, x = model_and_images
    threshold = float(plain_confidence(tta_logits(model, x, 0)).median())
    batch = tta_logits(model, x, 2, threshold)
    one_by_one = torch.cat([tta_logits(model, x[i : i + 1], 2, threshold) for i in range(len(x))])
    torch.testing.assert_close(batch, one_by_one, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_none_or_one_means_every_image_and_a_tiny_threshold_none(model_and_images) -> None:
    model, _, _, x = model_and_images
    full = tta_logits(model, x, 2)
    torch.testing.assert_close(tta_logits(model, x, 2, None), full)
    torch.testing.assert_close(tta_logits(model, x, 2, 1.0), full)
    torch.testing.assert_close(tta_logits(model, x, 2, 1e-9), tta_logits(model, x, 0))


def test_the_threshold_sends_the_asked_fraction_through_tta() -> None:
    logits = torch.randn(1000, 10) * 3
    threshold = fit_tta_confidence(logits, 0.25)
    below = float((plain_confidence(logits) < threshold).double().mean())
    assert abs(below - 0.25) <= 0.002
    assert fit_tta_confidence(logits, 1.0) is None


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_fraction_outside_0_1_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"train.tta_fraction must be in \(0, 1\]"):
        fit_tta_confidence(torch.randn(10, 10), fraction)


def test_fit_stores_the_threshold_and_measures_it(model_and_images) -> None:
    model, images, labels, _ = model_and_images
    fitted = fit_selective_tta(model, images, labels, 0.25)
    assert tta_confidence(model.config) == fitted.threshold is not None
    assert abs(fitted.fraction - 0.25) <= 1 / len(images) + 1e-9
    for accuracy in (fitted.accuracy_plain, fitted.accuracy_selective, fitted.accuracy_full):
        assert 0.0 <= accuracy <= 1.0
    # The composed logits are what predict_logits (the CLI, the service, evaluation) now returns.
    served = predict_logits(model, images, calibrated=False)
    torch.testing.assert_close(fitted.selective_logits, served, atol=1e-4, rtol=1e-4)
    assert fitted.accuracy_selective == float((served.argmax(1) == torch.as_tensor(labels)).double().mean())
    # predict_logits(selective=False): every image gets every view again.
    full = predict_logits(model, images, calibrated=False, selective=False)
    assert fitted.accuracy_full == float((full.argmax(1) == torch.as_tensor(labels)).double().mean())


def test_without_labels_only_the_threshold_is_fitted(model_and_images) -> None:
    model, images, _, _ = model_and_images
    fitted = fit_selective_tta(model, images, None, 0.5)
    assert fitted.threshold is not None and fitted.selective_logits is None
    assert fitted.accuracy_full is None and abs(fitted.fraction - 0.5) <= 1 / len(images) + 1e-9


def test_the_threshold_survives_save_and_load(tmp_path, model_and_images) -> None:
    from transformers import AutoModelForImageClassification

    import cifar10_pipeline.modeling  # noqa: F401  (registers the Auto classes)

    model, images, _, _ = model_and_images
    set_tta_confidence(model, 0.4321)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert tta_confidence(loaded.config) == pytest.approx(0.4321)
    np.testing.assert_allclose(
        predict_logits(loaded, images[:8]).numpy(), predict_logits(model, images[:8]).numpy(), atol=1e-5
    )


def test_a_model_saved_before_selective_tta_gives_every_image_every_view(model_and_images) -> None:
    model, _, _, _ = model_and_images
    assert tta_confidence({"tta_level": 2}) is None
    set_tta_confidence(model, None)
    assert tta_confidence(model.config) is None
    with pytest.raises(ValueError, match="confidence threshold"):
        set_tta_confidence(model, 1.5)
