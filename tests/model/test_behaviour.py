"""Behavioural tests of a trained model (Made-With-ML: invariance, directional, minimum functionality).

The model is a small conv net trained once per session on 2,000 real CIFAR-10 images (``real_quick_model`` in
conftest.py), saved and loaded back the way ``cifar10 predict`` loads it, and queried only through the shared
inference path (``predict_logits``). Thresholds sit well below what that model measures (see each test) and
well above what an untrained model or a model fed the wrong pixels gives, so each test can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel

from cifar10_pipeline import NUM_CLASSES
from cifar10_pipeline.modeling.inference import predict_logits
from cifar10_pipeline.modeling.model import load_model

from ..conftest import RealQuickModel

# Measured on the fixture model (2026-12-01, 500 test images, TTA level 0): top-1 agreement 0.70 under a
# horizontal flip and 0.83-0.90 under the five shifts below. An untrained network agrees more (0.82-0.96) by
# predicting nearly one class for everything, hence the spread check before any agreement is trusted.
MIN_FLIP_AGREEMENT = 0.6
MIN_SHIFT_AGREEMENT = 0.75
MAX_CLASS_SHARE = 0.3  # measured: the most predicted class takes 0.17 of the predictions (untrained: 0.48)
# Measured: 0.43 on its first 500 training images and 0.38 held-out (TTA level 2); chance is 0.10. Inputs
# turned upside down inside predict still give 0.34 held-out but only 0.31 on the training images, which
# the network fitted in their upright orientation: the training-image bar is the one that catches it.
MIN_TRAIN_ACCURACY = 0.37
MIN_TEST_ACCURACY = 0.30
# Blending A halfway toward B: p(B) rose for 0.83 of the 90 class pairs and its mean grew 1.38x (0.089 ->
# 0.123; label smoothing keeps this small model's probabilities low). Untrained: 0.17 and 0.99x.
MIN_SHARE_ROSE = 0.75
MIN_MEAN_GAIN = 1.2


@pytest.fixture(scope="module")
def model(real_quick_model: RealQuickModel) -> PreTrainedModel:
    return load_model(real_quick_model.model_dir)  # as the CLI loads it: config carries TTA and normalisation


def top1(model: PreTrainedModel, images: np.ndarray, tta_level: int | None = None) -> np.ndarray:
    return predict_logits(model, np.ascontiguousarray(images), tta_level=tta_level).argmax(1).numpy()


def probabilities(model: PreTrainedModel, images: np.ndarray) -> np.ndarray:
    return torch.softmax(predict_logits(model, np.ascontiguousarray(images)), dim=1).numpy()


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate (N, H, W, C) images by (dy, dx) pixels with reflect padding, as training augments them."""
    pad = max(abs(dy), abs(dx))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    h, w = images.shape[1:3]
    return padded[:, pad - dy : pad - dy + h, pad - dx : pad - dx + w]


def assert_not_degenerate(predictions: np.ndarray) -> None:
    """A constant predictor is perfectly invariant; demand predictions spread over most classes first."""
    counts = np.bincount(predictions, minlength=NUM_CLASSES)
    assert (counts > 0).sum() >= 7 and counts.max() <= MAX_CLASS_SHARE * len(predictions), f"counts {counts}"


# Invariance: at TTA level 0 (the network alone: levels 1 and 2 average over mirrored views, which would make
# the flip check pass by construction rather than by what the network learned).


def test_predictions_survive_a_horizontal_flip(model: PreTrainedModel, real_quick_model) -> None:
    images = real_quick_model.test.images
    original = top1(model, images, tta_level=0)
    assert_not_degenerate(original)
    agreement = float((top1(model, images[:, :, ::-1], tta_level=0) == original).mean())
    print(f"flip agreement (TTA 0): {agreement:.3f}")
    assert agreement >= MIN_FLIP_AGREEMENT, f"top-1 agreement under a horizontal flip {agreement:.3f}"


@pytest.mark.parametrize(("dy", "dx"), [(0, 1), (0, -2), (1, 0), (-2, 0), (1, -1)])
def test_predictions_survive_small_shifts(model: PreTrainedModel, real_quick_model, dy: int, dx: int) -> None:
    images = real_quick_model.test.images
    original = top1(model, images, tta_level=0)
    assert_not_degenerate(original)
    agreement = float((top1(model, shift(images, dy, dx), tta_level=0) == original).mean())
    print(f"shift ({dy}, {dx}) agreement (TTA 0): {agreement:.3f}")
    assert agreement >= MIN_SHIFT_AGREEMENT, f"top-1 agreement under a ({dy}, {dx}) shift {agreement:.3f}"


# Directional: blending a correctly classified image of class A toward a correctly classified image of class B
# must move probability toward B, step by step.


def test_blending_toward_another_class_moves_probability_to_it(
    model: PreTrainedModel, real_quick_model: RealQuickModel
) -> None:
    images, labels = real_quick_model.test.images, real_quick_model.test.labels
    correct = top1(model, images) == labels  # the model's own TTA level: the served path
    # One correctly classified image per class (the first in the split), then every ordered pair of classes.
    exemplar = {
        c: int(np.flatnonzero(correct & (labels == c))[0])
        for c in range(NUM_CLASSES)
        if (correct & (labels == c)).any()
    }
    assert len(exemplar) >= 7, f"only classes {sorted(exemplar)} have a correctly classified test image"
    pairs = [(a, b) for a in exemplar for b in exemplar if a != b]
    sources = images[[exemplar[a] for a, _ in pairs]].astype(np.float32)
    targets = images[[exemplar[b] for _, b in pairs]].astype(np.float32)
    toward = np.array([b for _, b in pairs])
    alphas = [0.0, 0.25, 0.5, 0.75]
    p_target = np.stack(
        [
            probabilities(model, np.rint((1 - a) * sources + a * targets).astype(np.uint8))[
                np.arange(len(pairs)), toward
            ]
            for a in alphas
        ]
    )  # (alphas, pairs)
    means = p_target.mean(1)
    rose = float((p_target[2] > p_target[0]).mean())
    print(f"{len(pairs)} pairs; mean p(B) at alpha {alphas}: {np.round(means, 3)}; rose at 0.5: {rose:.2f}")
    assert np.all(np.diff(means) > 0), f"mean p(B) along the blend {means}"
    assert means[2] >= MIN_MEAN_GAIN * means[0], f"mean p(B) {means[0]:.3f} -> {means[2]:.3f} at alpha 0.5"
    assert rose >= MIN_SHARE_ROSE, f"p(B) rose at alpha 0.5 for only {rose:.0%} of pairs"


# Minimum functionality.


def test_accuracy_on_its_training_images(model: PreTrainedModel, real_quick_model: RealQuickModel) -> None:
    train = real_quick_model.train.head(500)  # 500 of the 2,000 are enough; TTA makes each 4 forward passes
    accuracy = float((top1(model, train.images) == train.labels).mean())
    print(f"training-subset accuracy (first 500): {accuracy:.3f}")
    assert accuracy >= MIN_TRAIN_ACCURACY, f"accuracy {accuracy:.3f} on its own training images"


def test_accuracy_on_held_out_images(model: PreTrainedModel, real_quick_model: RealQuickModel) -> None:
    test = real_quick_model.test
    predictions = top1(model, test.images)
    accuracy = float((predictions == test.labels).mean())
    print(f"held-out accuracy ({len(test)} test images, TTA {model.config.tta_level}): {accuracy:.3f}")
    assert accuracy >= MIN_TEST_ACCURACY, f"accuracy {accuracy:.3f} on held-out test images (chance 0.10)"
    # Every class is learned at least a little: each one is recognised in some of its test images.
    per_class = np.array([(predictions[test.labels == c] == c).mean() for c in range(NUM_CLASSES)])
    assert per_class.min() > 0, f"per-class accuracy {np.round(per_class, 2)}"
