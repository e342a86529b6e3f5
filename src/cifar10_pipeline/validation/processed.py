"""Checks of the preprocess stage's train/val/test arrays, in plain numpy.

Facts about three arrays the pipeline made itself need no suites and get no Data Docs: eleven checks,
each failure reported in the raw suites' line format, ``preprocess: processed: <check>: observed <x>,
expected <y>``, collected in a ``DataValidationError``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cifar10_pipeline import CLASS_NAMES, IMAGE_SHAPE, NUM_CLASSES
from cifar10_pipeline.core.data import SPLITS, ArraySplit
from cifar10_pipeline.validation.common import CheckReport, DataValidationError, content_hash, listed

# The arrays are preprocess's own output: a structural failure is a bug in its split code, not bad data.
SPLIT_CODE_HINT = "fix split_arrays in stages/preprocess.py, then dvc repro preprocess"
# Row numbers go up to 49,999: any integer dtype of at least 32 bits holds them.
ARRAY_DTYPES = {
    "images": ("uint8",),
    "labels": ("int64",),
    "source_rows": ("int32", "int64", "uint32", "uint64"),
}
# check -> (what it counts, what it expects); {hint}, {known} and {tolerance} are filled in per call.
PROCESSED_CHECKS = {
    "image shape": ("splits", f"(N, {', '.join(map(str, IMAGE_SHAPE))}) image arrays; {{hint}}"),
    **{f"{a} dtype": ("splits", f"{a} of dtype {' or '.join(d)}; {{hint}}") for a, d in ARRAY_DTYPES.items()},
    "array lengths": ("splits", "as many labels and source_rows as images; {hint}"),
    "row counts": (
        "raw splits",
        "train + val rows = rows kept from raw train, test rows = rows kept from raw test; {hint}",
    ),
    "label range": ("images", f"labels in 0..{NUM_CLASSES - 1}; {{hint}}"),
    "source row": ("images", "non-negative rows of the raw split; {hint}"),
    "distinct source rows": (
        "images",
        "every raw row used once (train and val use distinct raw train rows); {hint}",
    ),
    "test images in train/val": (
        "train/val images",
        "at most {known} (no test image may be trained or tuned on; "
        "params.yaml validate.known_train_test_overlap)",
    ),
    "class share": (
        "split classes",
        f"{1 / NUM_CLASSES:.2f} ± {{tolerance}} per class (params.yaml validate.class_share_tolerance)",
    ),
}
SOURCE_SPLIT = {"train": "train", "val": "train", "test": "test"}


def check_processed_splits(
    splits: dict[str, ArraySplit],
    raw_sizes: dict[str, int],
    tolerance: float,
    *,
    known_train_test_overlap: int = 0,
) -> dict[str, Any]:
    """Validate the preprocess stage's train/val/test arrays; return a summary or raise DataValidationError.

    ``raw_sizes`` holds how many rows preprocess kept from each raw split (after any max_*_images cap):
    train + val must add up to ``raw_sizes["train"]`` and test to ``raw_sizes["test"]``. ``tolerance`` bounds
    each class's share around 1/10 (params.yaml validate.class_share_tolerance; processed splits may be
    stratified subsets). ``known_train_test_overlap`` is validate.known_train_test_overlap: images the raw
    test split shares with the raw train split, so they may legitimately reach train/val.
    """
    if set(splits) != set(SOURCE_SPLIT) or set(raw_sizes) != set(SPLITS):
        raise ValueError(
            f"check_processed_splits needs splits {sorted(SOURCE_SPLIT)} and raw_sizes {sorted(SPLITS)}, "
            f"got {sorted(splits)} and {sorted(raw_sizes)}"
        )
    found: dict[str, list[str]] = {check: [] for check in PROCESSED_CHECKS}
    for raw in SPLITS:
        names = [name for name in splits if SOURCE_SPLIT[name] == raw]
        if (count := sum(len(splits[name]) for name in names)) != raw_sizes[raw]:
            found["row counts"].append(f"{raw}: {count} rows in {' + '.join(names)}, {raw_sizes[raw]} kept")
    digests = {name: [content_hash(image) for image in split.images] for name, split in splits.items()}
    # pixels -> the first test row with them (reversed: earlier rows overwrite later ones)
    test_rows = {digest: f"test row {i}" for i, digest in reversed(list(enumerate(digests["test"])))}
    used: dict[tuple[str, int], str] = {}  # (raw split, raw row) -> the first processed row taken from it
    low, high = round(1 / NUM_CLASSES - tolerance, 6), round(1 / NUM_CLASSES + tolerance, 6)
    class_rows, checked = 0, {}  # checked: how many rows of each split the per-image checks saw
    for name, split in splits.items():
        images, labels, rows = split.images, split.labels, split.source_rows
        if images.shape[1:] != IMAGE_SHAPE:
            found["image shape"].append(f"{name} images: shape {images.shape}")
        for array, dtypes in ARRAY_DTYPES.items():
            if (dtype := getattr(split, array).dtype).name not in dtypes:
                found[f"{array} dtype"].append(f"{name} {array}: {dtype}")
        if not len(images) == len(labels) == len(rows):
            found["array lengths"].append(
                f"{name} (images {len(images)}, labels {len(labels)}, source_rows {len(rows)})"
            )
        checked[name] = min(len(images), len(labels), len(rows))  # rows past it: "array lengths"
        for i in range(checked[name]):
            item, label, row, source = f"{name} row {i}", int(labels[i]), int(rows[i]), SOURCE_SPLIT[name]
            if not 0 <= label < NUM_CLASSES:
                found["label range"].append(f"{item}: {label}")
            if row < 0:
                found["source row"].append(f"{item}: {row}")
            if (first := used.setdefault((source, row), item)) != item:
                found["distinct source rows"].append(f"{item}: raw {source} row {row}, as {first}")
            if name != "test" and (twin := test_rows.get(digests[name][i])):
                found["test images in train/val"].append(f"{item} (same pixels as {twin})")
        if len(labels):  # an empty val split (val_size 0) has no class shares
            # Clipped: out-of-range labels ("label range") land in an 11th bin, as no class.
            shares = np.bincount(
                np.clip(labels.astype(np.int64), 0, NUM_CLASSES), minlength=NUM_CLASSES
            ) / len(labels)
            found["class share"] += [
                f"{name} {cls} ({c}): {shares[c]:.4f}"
                for c, cls in enumerate(CLASS_NAMES)
                if not low <= shares[c] <= high
            ]
            class_rows += NUM_CLASSES

    totals = {
        "splits": len(splits),
        "raw splits": len(SPLITS),
        "split classes": class_rows,
        "images": sum(checked.values()),
        "train/val images": checked["train"] + checked["val"],
    }
    allowed = {"test images in train/val": known_train_test_overlap}
    failures = []
    for check, entries in found.items():
        if len(entries) > allowed.get(check, 0):
            unit, expected = PROCESSED_CHECKS[check]
            expected = expected.format(
                hint=SPLIT_CODE_HINT, known=known_train_test_overlap, tolerance=tolerance
            )
            observed = f"{len(entries)} of {totals[unit]} {unit}: {listed(entries, len(entries))}"
            failures.append(f"preprocess: processed: {check}: observed {observed}, expected {expected}")
    summary = CheckReport(
        failures, {"processed": {"evaluated": len(found), "failed": len(failures)}}
    ).summary()
    summary["images"] = {name: len(split) for name, split in splits.items()}
    summary["test_images_in_train_val"] = len(found["test images in train/val"])
    if failures:
        raise DataValidationError(failures, summary)
    return summary
