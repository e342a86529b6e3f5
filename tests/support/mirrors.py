"""A small mirror of real CIFAR-10 images, cut from the full mirror once per test session.

Subprocess tests (``dvc repro`` in a clone, the kill cases, the sweep) point ``download.mirror_dir`` at it and
set ``validate.train_images``/``validate.test_images`` to its sizes (``SMALL_MIRROR_PARAMS``), so that their
download and validate stages copy and check a few thousand real images instead of all 60,000. The rows are
the mirror's own Parquet rows (the original PNG bytes and labels), the first ones of each class, so the
splits are exactly balanced like the full ones, and the shards carry the same schema and a SHA256SUMS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from cifar10_pipeline import NUM_CLASSES
from cifar10_pipeline.core.data import split_files, write_checksums

# Per class: 2,000 train and 500 test images in all. Enough for validate's pixel statistics to stay within
# the data card's tolerance (validate.channel_stat_tolerance) and for the tiny runs' caps (400 and 100).
TRAIN_PER_CLASS = 200
TEST_PER_CLASS = 50
SMALL_MIRROR_SIZES = {"train": TRAIN_PER_CLASS * NUM_CLASSES, "test": TEST_PER_CLASS * NUM_CLASSES}
# The overrides (Hydra -S / core.params syntax) that make a run expect the small mirror's sizes.
SMALL_MIRROR_PARAMS = tuple(f"validate.{split}_images={size}" for split, size in SMALL_MIRROR_SIZES.items())


def first_rows_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Row indices of the first ``per_class`` rows of each class, in their original order."""
    chosen = np.concatenate([np.flatnonzero(labels == label)[:per_class] for label in range(NUM_CLASSES)])
    return np.sort(chosen)


def write_small_mirror(source: Path, target: Path) -> Path:
    """Cut the small mirror from ``source`` (a full mirror) into ``target``: two train shards, one test."""
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for split, per_class, shards in (("train", TRAIN_PER_CLASS, 2), ("test", TEST_PER_CLASS, 1)):
        # the shards as stored (schema, metadata and PNG bytes), not the package's decoded view
        table = pa.concat_tables([pq.read_table(path) for path in split_files(source, split)])
        rows = first_rows_per_class(table.column("label").to_numpy(), per_class)
        subset = table.take(rows)
        for index, part in enumerate(np.array_split(np.arange(len(rows)), shards)):
            name = f"{split}-{index:05d}-of-{shards:05d}.parquet"
            pq.write_table(subset.take(part), target / name)
            names.append(name)
    write_checksums(target, names)
    return target


@contextlib.contextmanager
def shared_small_mirror(source: Path, base: Path) -> Iterator[Path]:
    """The small mirror under ``base`` (a folder every xdist worker of the session sees), written by
    whichever process gets there first."""
    target = base / "small-mirror"
    with FileLock(str(base / "small-mirror.lock")):
        if not (target / "SHA256SUMS").is_file():
            write_small_mirror(source, target)
    yield target
