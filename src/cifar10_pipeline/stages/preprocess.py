"""Stage 3, preprocess: decode the raw splits to uint8 arrays and hold out a stratified validation split.

Outputs ``data/processed/{train,val,test}.npz`` (images (N, 32, 32, 3) uint8, labels, and each image's row in
its raw split for traceability). The validation images come from the training split only; nothing is fitted
or chosen on the test split (only the MLflow `champion` alias compares test accuracy, as the model card
says). Deterministic for a given seed; ``max_*_images`` make stratified subsets for
quick runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from cifar10_pipeline import NUM_CLASSES
from cifar10_pipeline.core.data import ArraySplit, decode_split, read_raw_split, save_split
from cifar10_pipeline.core.errors import run_cli
from cifar10_pipeline.core.io import atomic_output, write_json_atomic
from cifar10_pipeline.core.params import (
    ParamsError,
    PreprocessParams,
    ValidateParams,
    load_params,
    split_size_problems,
)
from cifar10_pipeline.core.paths import PROCESSED_DIR, PROCESSED_VALIDATION, RAW_DIR
from cifar10_pipeline.tracking.runs import stage_run


def stratified_subset(labels: np.ndarray, rows: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """``size`` of ``rows`` with class proportions kept (all of them when size is None or too large)."""
    if size is None or size >= len(rows):
        return rows
    if len(rows) - size < NUM_CLASSES:
        # Fewer rows left out than classes: too few to stratify (scikit-learn refuses), and too few to
        # move any class's share; leave out that many at random.
        left_out = np.random.default_rng(seed).choice(len(rows), len(rows) - size, replace=False)
        return np.sort(np.delete(rows, left_out))
    kept, _ = train_test_split(rows, train_size=size, stratify=labels[rows], random_state=seed)
    return np.sort(kept)


def split_arrays(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    params: PreprocessParams,
) -> dict[str, ArraySplit]:
    # params.yaml was checked against CIFAR-10's split sizes; check again against the data at hand.
    problems = split_size_problems(params, len(train_labels), len(test_labels))
    if problems:
        raise ParamsError(
            f"the preprocess params do not fit the raw data ({len(train_labels)} training and "
            f"{len(test_labels)} test images):\n  " + "\n  ".join(problems)
        )
    train_rows = stratified_subset(
        train_labels, np.arange(len(train_labels)), params.max_train_images, params.seed
    )
    if params.val_size:
        fit_rows, val_rows = train_test_split(
            train_rows, test_size=params.val_size, stratify=train_labels[train_rows], random_state=params.seed
        )
        fit_rows, val_rows = np.sort(fit_rows), np.sort(val_rows)
    else:
        fit_rows, val_rows = train_rows, train_rows[:0]
    test_rows = stratified_subset(
        test_labels, np.arange(len(test_labels)), params.max_test_images, params.seed
    )
    return {
        "train": ArraySplit(train_images[fit_rows], train_labels[fit_rows], fit_rows),
        "val": ArraySplit(train_images[val_rows], train_labels[val_rows], val_rows),
        "test": ArraySplit(test_images[test_rows], test_labels[test_rows], test_rows),
    }


def preprocess(
    params: PreprocessParams,
    checks: ValidateParams,
    raw_dir: Path = RAW_DIR,
    out_dir: Path = PROCESSED_DIR,
    checks_file: Path = PROCESSED_VALIDATION,
) -> dict[str, int]:
    """Decode, split and check; the arrays are written only if the checks on them pass."""
    from cifar10_pipeline.validation.processed import check_processed_splits

    train_images, train_labels = decode_split(read_raw_split(raw_dir, "train"), "train")
    test_images, test_labels = decode_split(read_raw_split(raw_dir, "test"), "test")
    splits = split_arrays(train_images, train_labels, test_images, test_labels, params)
    # What the params asked for, computed independently of the split code the checks are checking.
    kept = {
        "train": min(params.max_train_images or len(train_labels), len(train_labels)),
        "test": min(params.max_test_images or len(test_labels), len(test_labels)),
    }
    summary = check_processed_splits(
        splits,
        kept,
        checks.class_share_tolerance,
        known_train_test_overlap=checks.known_train_test_overlap,
    )
    with atomic_output(Path(out_dir)) as staging:
        staging.mkdir()
        for name, split in splits.items():
            save_split(staging / f"{name}.npz", split)
    write_json_atomic(checks_file, summary)
    counts = {name: len(split) for name, split in splits.items()}
    print(f"preprocess: {counts} -> {out_dir} ({summary['evaluated']} checks passed)")
    return counts


def main() -> None:
    params = load_params()
    with stage_run("preprocess", params, outputs=(PROCESSED_DIR, PROCESSED_VALIDATION)) as run:
        counts = preprocess(params.preprocess, params.validation)
        run.log_metrics({f"images_{name}": n for name, n in counts.items()})


if __name__ == "__main__":
    run_cli(main)
