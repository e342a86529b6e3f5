"""Figures people would rather look at than read. All written as PNG with the non-interactive backend."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cifar10_pipeline import CLASS_NAMES

if TYPE_CHECKING:
    import matplotlib.pyplot as plt


def _pyplot():
    """matplotlib.pyplot on the headless backend, imported on first use: a stage pays for it only when it
    draws (a second on a slow disk, before the train stage could start training)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: stages and CI have no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: plt.Figure, path: Path) -> None:
    plt = _pyplot()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_matrix(matrix: np.ndarray, path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(CLASS_NAMES)):
        for j in range(len(CLASS_NAMES)):
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    int(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if shares[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the true class")
    _save(fig, path)


def per_class_scores(per_class: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(CLASS_NAMES))
    for offset, key in zip((-0.25, 0, 0.25), ("precision", "recall", "f1"), strict=True):
        ax.bar(x + offset, [per_class[name][key] for name in CLASS_NAMES], width=0.25, label=key)
    low = min(min(per_class[name][k] for k in ("precision", "recall", "f1")) for name in CLASS_NAMES)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xticks(x, CLASS_NAMES, rotation=45, ha="right")
    ax.set_title("Per-class precision, recall and F1 (test set)")
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def reliability_diagram(bins: list[dict], ece: float, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    centers = [(b["lower"] + b["upper"]) / 2 for b in bins if b["count"]]
    accuracy = [b["accuracy"] for b in bins if b["count"]]
    width = bins[0]["upper"] - bins[0]["lower"]
    ax.bar(centers, accuracy, width=width * 0.95, edgecolor="black", label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability diagram (ECE = {ece:.4f})")
    ax.legend(loc="upper left")
    _save(fig, path)


def robustness(table: dict[str, dict[str, float]], clean_accuracy: float, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, by_severity in table.items():
        severities = sorted(by_severity, key=int)
        ax.plot(
            [0, *map(int, severities)],
            [clean_accuracy, *(by_severity[s] for s in severities)],
            marker="o",
            label=name,
        )
    ax.set_xticks([0, 1, 2, 3], ["clean", "1", "2", "3"])
    ax.set_xlabel("severity")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy under corruptions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def mistake_gallery(
    images: np.ndarray, probabilities: np.ndarray, labels: np.ndarray, picks: dict[int, list[int]], path: Path
) -> None:
    columns = max((len(v) for v in picks.values()), default=1) or 1
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(CLASS_NAMES), columns, figsize=(1.6 * columns + 1, 1.7 * len(CLASS_NAMES)), squeeze=False
    )
    for row, name in enumerate(CLASS_NAMES):
        for col in range(columns):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(picks[row]):
                i = picks[row][col]
                predicted = int(probabilities[i].argmax())
                ax.imshow(images[i], interpolation="nearest")
                ax.set_title(f"{CLASS_NAMES[predicted]} {probabilities[i, predicted]:.2f}", fontsize=7)
        axes[row, 0].text(-4, 16, name, ha="right", va="center", fontsize=8)
    fig.suptitle("Most confident mistakes per true class (title: predicted label, confidence)", fontsize=9)
    _save(fig, path)


def training_curves(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    if any(h.get("val_loss") not in (None, "") for h in history):
        left.plot(epochs, [float(h["val_loss"]) for h in history], marker="o", label="validation")
        right.plot(epochs, [float(h["val_accuracy"]) for h in history], marker="o", label="validation")
    right.plot(epochs, [h["train_accuracy"] for h in history], marker="o", label="train (augmented)")
    left.set_title("loss")
    right.set_title("accuracy")
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
