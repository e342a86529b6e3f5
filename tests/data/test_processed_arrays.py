"""Processed arrays are checked where training and evaluation load them (core.data.load_split), and the
preprocess split sizes are checked against the raw data before scikit-learn sees them."""

from __future__ import annotations

import copy
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cifar10_pipeline.core.data import ArraySplit, DataError, load_split, save_split
from cifar10_pipeline.core.params import ParamsError, PreprocessParams
from cifar10_pipeline.stages.preprocess import split_arrays, stratified_subset

from ..conftest import synthetic_images
from ..support.helpers import train_params


def _split(n: int = 30, seed: int = 0) -> ArraySplit:
    images, labels = synthetic_images(n, seed=seed)
    return ArraySplit(images, labels, np.arange(n))


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


@pytest.mark.reliability(
    "a label out of range (10, -1) in the processed arrays",
    "loading the split fails with the file, the row and the range named, before any training step",
)
@pytest.mark.parametrize("bad", [10, -1, 255])
def test_label_out_of_range_names_the_file(tmp_path: Path, bad: int) -> None:
    split = _split()
    labels = split.labels.copy()
    labels[7] = bad
    path = tmp_path / "train.npz"
    save_split(path, ArraySplit(split.images, labels, split.source_rows))
    with pytest.raises(
        DataError, match=rf"^{path}: label {bad} at row 7 is outside 0\.\.9 \(1 such label\(s\)\)"
    ):
        load_split(path)


@pytest.mark.reliability(
    "processed labels of the wrong dtype or shape, or not one per image",
    "loading the split fails with the file named and what is wrong",
)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"labels": np.zeros(30, np.float32)},
            r"labels must be integers of shape \(N,\), got float32 \(30,\)",
        ),
        (
            {"labels": np.zeros((30, 1), np.int64)},
            r"labels must be integers of shape \(N,\), got int64 \(30, 1\)",
        ),
        ({"labels": np.zeros(29, np.int64)}, r"30 images but 29 labels and 30 source rows"),
        ({"source_rows": np.arange(31)}, r"30 images but 30 labels and 31 source rows"),
        ({"images": np.zeros((30, 32, 32), np.uint8)}, r"images must be uint8 \(N, 32, 32, 3\)"),
    ],
)
def test_label_dtype_and_shape_are_checked(tmp_path: Path, change: dict, message: str) -> None:
    split = _split()
    arrays = {"images": split.images, "labels": split.labels, "source_rows": split.source_rows, **change}
    path = _write_npz(tmp_path / "val.npz", **arrays)
    with pytest.raises(DataError, match=rf"^{path}: {message}"):
        load_split(path)


@pytest.mark.reliability(
    "a processed .npz that holds a pickled object array, lacks an array, or is not a zip",
    "refused with the file named; nothing is unpickled",
)
def test_unreadable_or_pickled_npz(tmp_path: Path) -> None:
    split = _split()
    pickled = _write_npz(
        tmp_path / "a.npz",
        images=split.images,
        labels=np.array([object()] * 30),
        source_rows=split.source_rows,
    )
    with pytest.raises(DataError, match=r"a\.npz is not a readable processed split .*allow_pickle"):
        load_split(pickled)
    missing = _write_npz(tmp_path / "b.npz", images=split.images, labels=split.labels)
    with pytest.raises(DataError, match=r"b\.npz: lacks array\(s\) \['source_rows'\]"):
        load_split(missing)
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"c\.npz is not a readable processed split"):
        load_split(tmp_path / "c.npz")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("images.npy", b"\x93NUMPY truncated")
    (tmp_path / "d.npz").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match=r"d\.npz"):
        load_split(tmp_path / "d.npz")


def test_good_split_loads_unchanged(tmp_path: Path) -> None:
    split = _split()
    save_split(tmp_path / "test.npz", split)
    loaded = load_split(tmp_path / "test.npz")
    np.testing.assert_array_equal(loaded.labels, split.labels)
    np.testing.assert_array_equal(loaded.images, split.images)


@pytest.mark.reliability(
    "the train stage given processed arrays with a label of 10",
    "it stops with a DataError naming data/processed/train.npz instead of a raw torch error mid-training",
)
def test_training_refuses_bad_labels_before_it_starts(tmp_path: Path) -> None:
    from cifar10_pipeline.stages import train as train_stage

    split = _split(200)
    labels = split.labels.copy()
    labels[3] = 10
    processed = tmp_path / "data" / "processed"
    processed.mkdir(parents=True)
    save_split(processed / "train.npz", ArraySplit(split.images, labels, split.source_rows))
    save_split(processed / "val.npz", _split(50, seed=1))
    epochs = []
    hp = train_params(widths=[8, 16, 16], epochs=1, batch_size=50, device="cpu", tta_level=0)
    with pytest.raises(DataError, match=r"train\.npz: label 10 at row 3 is outside 0\.\.9"):
        train_stage.train(hp, processed, on_epoch=epochs.append)
    assert epochs == []


# --- preprocess sizes against the raw data at hand ---------------------------------------------------------

PRE = PreprocessParams(seed=0, val_size=100, max_train_images=None, max_test_images=None)


@pytest.mark.reliability(
    "preprocess params that fit CIFAR-10 but not the raw data at hand (a small mirror)",
    "the preprocess stage names the keys and the raw split sizes instead of a scikit-learn error",
)
@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"val_size": 200}, "preprocess.val_size (200) must be smaller than the 200 training images kept"),
        ({"val_size": 150}, "the train split would keep 50 images"),
        ({"max_test_images": None, "val_size": 100}, "the test split would keep 50 images"),
    ],
)
def test_split_sizes_are_checked_against_the_raw_data(changes: dict, fragment: str) -> None:
    train, test = _split(200), _split(100 if "max_test_images" not in changes else 50, seed=1)
    params = PRE.model_copy(update=changes)
    with pytest.raises(ParamsError, match="do not fit the raw data") as error:
        split_arrays(train.images, train.labels, test.images, test.labels, params)
    assert fragment in str(error.value)


def test_subset_that_leaves_out_fewer_rows_than_classes() -> None:
    # 5 of 200 left out: scikit-learn cannot stratify 5 rows over 10 classes; they are left out at random.
    labels = _split(200).labels
    kept = stratified_subset(labels, np.arange(200), 195, seed=0)
    assert len(kept) == 195 and len(set(kept)) == 195 and np.all(np.diff(kept) > 0)
    np.testing.assert_array_equal(kept, stratified_subset(labels, np.arange(200), 195, seed=0))
    # The usual case is unchanged (scikit-learn's stratified split).
    assert np.bincount(labels[stratified_subset(labels, np.arange(200), 100, seed=0)]).tolist() == [10] * 10


def test_exact_minimum_splits() -> None:
    train, test = _split(200), _split(100, seed=1)
    splits = split_arrays(train.images, train.labels, test.images, test.labels, copy.copy(PRE))
    assert {name: len(split) for name, split in splits.items()} == {"train": 100, "val": 100, "test": 100}
    for split in splits.values():
        assert np.bincount(split.labels).tolist() == [10] * 10
