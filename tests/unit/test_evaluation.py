"""Evaluation maths on arrays whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from cifar10_pipeline.evaluation.metrics import (
    CORRUPTIONS,
    SEVERITIES,
    calibration,
    classification_metrics,
    corrupt,
    most_confident_mistakes,
)

from ..conftest import synthetic_images


def test_metrics_and_class_gap() -> None:
    labels = np.repeat(np.arange(10), 10)
    predictions = labels.copy()
    predictions[:5] = 1  # half of class 0 predicted as class 1
    report = classification_metrics(labels, predictions)
    assert report["accuracy"] == pytest.approx(0.95)
    assert report["per_class"]["airplane"]["recall"] == pytest.approx(0.5)
    assert report["per_class"]["automobile"]["precision"] == pytest.approx(10 / 15)
    assert report["class_gap"]["worst_class"] == "airplane"
    assert report["class_gap"]["best_f1"] == pytest.approx(1.0)
    assert 0 < report["f1_macro"] < 1


def test_calibration_of_a_perfectly_calibrated_model() -> None:
    rng = np.random.default_rng(0)
    n = 20000
    confidence = rng.uniform(0.1, 1.0, n)
    correct = rng.uniform(size=n) < confidence
    probabilities = np.zeros((n, 10))
    predicted = rng.integers(0, 10, n)
    probabilities[np.arange(n), predicted] = confidence
    labels = np.where(correct, predicted, (predicted + 1) % 10)
    result = calibration(probabilities, labels, bins=10)
    assert result["ece"] < 0.02
    assert sum(b["count"] for b in result["bins"]) == n


def test_calibration_of_an_overconfident_model() -> None:
    probabilities = np.tile(np.eye(10)[0], (100, 1))  # always 100% sure of class 0
    labels = np.repeat(np.arange(10), 10)
    assert calibration(probabilities, labels, bins=15)["ece"] == pytest.approx(0.9)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_keep_shape_and_grow_with_severity(name: str) -> None:
    images, _ = synthetic_images(16, seed=3)
    distances = []
    for severity in SEVERITIES:
        out = corrupt(images, name, severity)
        assert out.shape == images.shape and out.dtype == np.uint8
        distances.append(np.abs(out.astype(int) - images).mean())
    assert distances[0] > 0
    assert distances == sorted(distances)
    np.testing.assert_array_equal(corrupt(images, name, 2, seed=7), corrupt(images, name, 2, seed=7))


def test_bad_corruption_arguments() -> None:
    images, _ = synthetic_images(2, seed=0)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "blur", 4)


def test_most_confident_mistakes_are_ordered() -> None:
    probabilities = np.full((4, 10), 0.0)
    probabilities[0, 1], probabilities[1, 2], probabilities[2, 0], probabilities[3, 3] = 0.6, 0.9, 1.0, 0.7
    labels = np.array([0, 0, 0, 0])
    picks = most_confident_mistakes(probabilities, labels, per_class=2)
    assert picks[0] == [1, 3]  # row 2 is correct; the others sorted by confidence
    assert picks[5] == []
