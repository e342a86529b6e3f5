"""Checksums, all-or-nothing outputs and decoding of the raw Parquet splits."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cifar10_pipeline.core.data import (
    DataError,
    decode_image,
    decode_png,
    decode_split,
    read_raw_shard,
    read_raw_split,
    verify_checksums,
)
from cifar10_pipeline.core.io import atomic_output
from cifar10_pipeline.stages.download import write_parquet_split

from ..conftest import synthetic_images


def test_checksums_verify_and_catch_a_changed_byte(synthetic_mirror: Path) -> None:
    assert len(verify_checksums(synthetic_mirror)) == 3
    shard = synthetic_mirror / "test-00000-of-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum mismatch"):
        verify_checksums(synthetic_mirror)


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_output(target) as staged:
        staged.mkdir()
        (staged / "half.txt").write_text("partial")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no scratch folder left either


def test_atomic_output_replaces_the_old_output(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old")
    with atomic_output(target) as staged:
        staged.write_text("new")
    assert target.read_text() == "new"


def test_decode_round_trip(synthetic_mirror: Path) -> None:
    images, labels = decode_split(read_raw_split(synthetic_mirror, "train"), "train")
    expected_images, expected_labels = synthetic_images(200, seed=1)
    np.testing.assert_array_equal(images, expected_images)  # PNG is lossless
    np.testing.assert_array_equal(labels, expected_labels)


def _split_with(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    write_parquet_split(tmp_path / "train-00000-of-00001.parquet", images, labels)
    return tmp_path


def test_label_out_of_range_is_rejected(tmp_path: Path) -> None:
    images, labels = synthetic_images(20, seed=0)
    labels[7] = 10
    with pytest.raises(DataError, match=r"label 10 at row 7"):
        decode_split(read_raw_split(_split_with(tmp_path, images, labels), "train"), "train")


def test_wrong_shape_is_rejected(tmp_path: Path) -> None:
    images = np.zeros((3, 28, 28, 3), np.uint8)
    with pytest.raises(DataError, match=r"shape \(28, 28, 3\)"):
        decode_split(read_raw_split(_split_with(tmp_path, images, np.zeros(3, np.int64)), "train"), "train")


def test_corrupt_parquet_is_reported(tmp_path: Path) -> None:
    (tmp_path / "train-00000-of-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_raw_split(tmp_path, "train")


def test_missing_split_tells_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dvc repro download"):
        read_raw_split(tmp_path, "test")


def test_a_shard_reads_alone_and_splits_concatenate_their_shards(synthetic_mirror: Path) -> None:
    first, second = sorted(synthetic_mirror.glob("train-*.parquet"))
    shard = read_raw_shard(first)
    assert shard.column_names == ["image_bytes", "label"] and shard.num_rows == 100
    split = read_raw_split(synthetic_mirror, "train")
    assert split.equals(pa.concat_tables([shard, read_raw_shard(second)]))


def test_an_image_struct_without_bytes_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"img": [{"path": "a.png"}], "label": [0]}), path)
    with pytest.raises(
        DataError, match=r"column 'img' is struct<path: string>; it must be a struct with a 'bytes'"
    ):
        read_raw_shard(path)


def test_an_empty_shard_reads_as_no_rows(tmp_path: Path) -> None:
    write_parquet_split(
        tmp_path / "test-00000-of-00001.parquet", np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0)
    )
    table = read_raw_split(tmp_path, "test")
    assert table.num_rows == 0 and table.schema.field("image_bytes").type == pa.binary()


def test_decode_image_keeps_the_mode_and_decode_png_says_where() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(buffer, format="PNG")
    pixels, mode = decode_image(buffer.getvalue())
    assert mode == "L" and pixels.shape == (32, 32) and pixels.dtype == np.uint8
    with pytest.raises(DataError, match=r"^image does not decode \(\w+: .+\)$"):
        decode_image(buffer.getvalue()[:60])
    with pytest.raises(DataError, match=r"^train row 3: image bytes are null$"):
        decode_png(None, "train row 3")
