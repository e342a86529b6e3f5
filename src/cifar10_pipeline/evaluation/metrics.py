"""Measurements of a trained classifier: accuracy/F1, per-class behaviour, calibration, robustness."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from cifar10_pipeline import CLASS_NAMES


def classification_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict:
    """Headline and per-class figures (scikit-learn), plus the spread between the best and worst class."""
    classes = list(range(len(CLASS_NAMES)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(CLASS_NAMES)
    }
    best, worst = int(np.argmax(f1)), int(np.argmin(f1))
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1_macro": float(f1_score(labels, predictions, average="macro", labels=classes, zero_division=0)),
        "f1_weighted": float(
            f1_score(labels, predictions, average="weighted", labels=classes, zero_division=0)
        ),
        "per_class": per_class,
        "class_gap": {
            "best_class": CLASS_NAMES[best],
            "best_f1": float(f1[best]),
            "worst_class": CLASS_NAMES[worst],
            "worst_f1": float(f1[worst]),
            "f1_gap": float(f1[best] - f1[worst]),
            "recall_gap": float(recall.max() - recall.min()),
        },
    }


def calibration(probabilities: np.ndarray, labels: np.ndarray, bins: int) -> dict:
    """Expected calibration error over equal-width confidence bins, and the bins for a reliability diagram."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Right-closed bins so a confidence of exactly 1.0 lands in the last one.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        if count:
            accuracy, mean_confidence = float(correct[mask].mean()), float(confidence[mask].mean())
            ece += count / len(labels) * abs(accuracy - mean_confidence)
        else:
            accuracy = mean_confidence = None
        table.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    nll = float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"ece": float(ece), "nll": nll, "mean_confidence": float(confidence.mean()), "bins": table}


# --- Corruptions, made on the fly from uint8 (N, 32, 32, 3) images, three severities each ----------------


def _gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = (0.04, 0.08, 0.12)[severity - 1] * 255
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)


def _pil_each(images: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(image)).convert("RGB")) for image in images])


def _blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius = (0.5, 0.8, 1.1)[severity - 1]
    return _pil_each(images, lambda im: im.filter(ImageFilter.GaussianBlur(radius)))


def _brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    delta = (0.1, 0.2, 0.3)[severity - 1] * 255
    return np.clip(images.astype(np.float32) + delta, 0, 255).astype(np.uint8)


def _contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = (0.6, 0.4, 0.25)[severity - 1]
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return np.clip((x - mean) * factor + mean, 0, 255).astype(np.uint8)


def _jpeg(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = (50, 25, 10)[severity - 1]

    def recompress(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue()))

    return _pil_each(images, recompress)


def _shift(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    pixels = (2, 3, 4)[severity - 1]
    dy, dx = rng.choice([-pixels, pixels], size=(2, len(images)))
    out = np.zeros_like(images)  # vacated border is black, like a camera that moved
    for i, image in enumerate(images):
        out[i] = np.roll(image, (dy[i], dx[i]), axis=(0, 1))
        if dy[i] > 0:
            out[i, : dy[i]] = 0
        else:
            out[i, dy[i] :] = 0
        if dx[i] > 0:
            out[i, :, : dx[i]] = 0
        else:
            out[i, :, dx[i] :] = 0
    return out


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "blur": _blur,
    "brightness": _brightness,
    "contrast": _contrast,
    "jpeg": _jpeg,
    "shift": _shift,
}
SEVERITIES = (1, 2, 3)


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {sorted(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    return CORRUPTIONS[name](images, severity, np.random.default_rng(seed))


def most_confident_mistakes(
    probabilities: np.ndarray, labels: np.ndarray, per_class: int
) -> dict[int, list[int]]:
    """For each true class, indices of its wrong predictions with the highest confidence."""
    predictions = probabilities.argmax(1)
    confidence = probabilities.max(1)
    result = {}
    for c in range(len(CLASS_NAMES)):
        wrong = np.flatnonzero((labels == c) & (predictions != c))
        result[c] = wrong[np.argsort(-confidence[wrong], kind="stable")][:per_class].tolist()
    return result
