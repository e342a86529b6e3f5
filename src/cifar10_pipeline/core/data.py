"""Data access shared by the stages: checksums, raw Parquet shards and their PNG images, processed arrays.
(Writing outputs all or nothing is core/io.py.)"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cifar10_pipeline import CLASS_NAMES, IMAGE_SHAPE, NUM_CLASSES
from cifar10_pipeline.core.errors import PipelineError
from cifar10_pipeline.core.hashing import CHECKSUM_FILE, file_digest

SPLITS = ("train", "test")
PROCESSED_SPLITS = ("train", "val", "test")
# What the processed arrays' labels may be stored as (save_split writes int64).
LABEL_DTYPES = (np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint32)


class DataError(PipelineError, RuntimeError):
    """The data on disk is missing, corrupt or not what the pipeline expects."""


def check_file_name(name: str, where: str) -> str:
    """``name`` if it is a plain file name (no folder, not absolute, not ``..``); else a DataError naming
    ``where`` it came from. Names from checksum files and remote listings become local paths: one that
    climbs out of its folder must be refused, not followed."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or Path(name).is_absolute()
        or Path(name).name != name
    ):
        raise DataError(
            f"{where}: refusing the file name {name!r}: only plain file names (no folders, no absolute "
            "paths, no '..') are allowed"
        )
    return name


def read_checksums(path: Path) -> dict[str, str]:
    """Parse a ``sha256sum``-style file into {file name: hex digest}."""
    if not path.is_file():
        raise DataError(f"checksum file {path} is missing")
    sums: dict[str, str] = {}
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(f"{path}:{line_number}: expected '<sha256>  <file name>', got {line!r}")
        name = check_file_name(parts[1].removeprefix("*"), f"{path}:{line_number}")
        sums[name] = parts[0].lower()
    return sums


def write_checksums(directory: Path, names: list[str]) -> None:
    lines = [f"{file_digest(directory / name)}  {name}" for name in sorted(names)]
    (directory / CHECKSUM_FILE).write_text("\n".join(lines) + "\n")


def verify_checksums(directory: Path) -> dict[str, str]:
    """Check every file listed in ``directory/SHA256SUMS``; raise on the first mismatch."""
    expected = read_checksums(directory / CHECKSUM_FILE)
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            raise DataError(f"{path} is listed in {CHECKSUM_FILE} but missing")
        actual = file_digest(path)
        if actual != digest:
            raise DataError(
                f"checksum mismatch for {path}: expected sha256 {digest}, got {actual}. "
                "The file is corrupt or was changed; fetch it again."
            )
    return expected


def split_files(raw_dir: Path, split: str) -> list[Path]:
    files = sorted(Path(raw_dir).glob(f"{split}-*.parquet"))
    if not files:
        raise DataError(
            f"no Parquet files for split {split!r} in {raw_dir} (expected {split}-*.parquet); "
            "run the download stage first: dvc repro download"
        )
    return files


def read_raw_shard(path: Path) -> pa.Table:
    """Read one Parquet shard in the uoft-cs/cifar10 schema as a table with ``image_bytes`` and ``label``."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path} is not a readable Parquet file: {exc}") from None
    missing = {"img", "label"} - set(table.column_names)
    if missing:
        raise DataError(f"{path} lacks column(s) {sorted(missing)}; expected the uoft-cs/cifar10 schema")
    image_type = table.schema.field("img").type
    if not pa.types.is_struct(image_type) or image_type.get_field_index("bytes") < 0:
        raise DataError(f"{path}: column 'img' is {image_type}; it must be a struct with a 'bytes' field")
    # An explicit type: a column with no chunks has none to infer it from.
    images = pa.chunked_array(
        [chunk.field("bytes") for chunk in table.column("img").chunks], type=image_type.field("bytes").type
    )
    return pa.table({"image_bytes": images, "label": table.column("label")})


def read_raw_split(raw_dir: Path, split: str) -> pa.Table:
    """Read one split's Parquet shards, in order, as a table with ``image_bytes`` and ``label`` columns."""
    return pa.concat_tables([read_raw_shard(path) for path in split_files(raw_dir, split)])


def decode_image(data: bytes | None) -> tuple[np.ndarray, str]:
    """Decode stored image bytes to (pixels as stored, PIL mode); the DataError says why not, not where."""
    if data is None:
        raise DataError("image bytes are null")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(image), image.mode
    except Exception as exc:  # Pillow raises many types for corrupt input
        raise DataError(f"image does not decode ({type(exc).__name__}: {exc})") from None


def decode_png(data: bytes | None, where: str) -> np.ndarray:
    """Decode one stored image to an (H, W, C) uint8 array, keeping its true channel count."""
    try:
        return decode_image(data)[0]
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def decode_split(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode a raw split to (N, 32, 32, 3) uint8 images and int64 labels, failing loudly on any bad row."""
    labels = table.column("label").to_numpy(zero_copy_only=False)
    if table.column("label").null_count:
        raise DataError(f"{name}: {table.column('label').null_count} null label(s)")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(f"{name}: label {labels[bad[0]]} at row {bad[0]} is outside 0..{NUM_CLASSES - 1}")
    images = np.empty((len(labels), *IMAGE_SHAPE), dtype=np.uint8)
    for row, data in enumerate(table.column("image_bytes").to_pylist()):
        array = decode_png(data, f"{name} row {row}")
        if array.shape != IMAGE_SHAPE:
            raise DataError(f"{name} row {row}: image has shape {array.shape}, expected {IMAGE_SHAPE}")
        images[row] = array
    return images, labels.astype(np.int64)


@dataclass(frozen=True)
class ArraySplit:
    """Decoded images (N, 32, 32, 3) uint8, labels (N,) int64 and each image's row in its raw split."""

    images: np.ndarray
    labels: np.ndarray
    source_rows: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> ArraySplit:
        return ArraySplit(self.images[:n], self.labels[:n], self.source_rows[:n])


def save_split(path: Path, split: ArraySplit) -> None:
    with open(path, "wb") as handle:  # np.savez would append .npz to a bare path
        np.savez(handle, images=split.images, labels=split.labels, source_rows=split.source_rows)


def load_split(path: Path) -> ArraySplit:
    """Read one processed split and check what training and evaluation rely on: uint8 (N, 32, 32, 3)
    images, one integer label in 0..9 per image, one source row per image. A DataError names the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found; run the preprocess stage first: dvc repro preprocess")
    redo = "; the file is not what the preprocess stage writes: dvc repro --force preprocess"
    try:
        # allow_pickle=False: an .npz holding pickled objects is refused, never unpickled.
        with np.load(path, allow_pickle=False) as arrays:
            missing = {"images", "labels", "source_rows"} - set(arrays.files)
            if missing:
                raise DataError(f"{path}: lacks array(s) {sorted(missing)}{redo}")
            split = ArraySplit(arrays["images"], arrays["labels"], arrays["source_rows"])
    except (OSError, ValueError, EOFError) as exc:  # not a zip, a truncated member, an object array
        raise DataError(f"{path} is not a readable processed split ({exc}){redo}") from None
    images, labels = split.images, split.labels
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{path}: images must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}{redo}"
        )
    if labels.ndim != 1 or labels.dtype not in LABEL_DTYPES:
        raise DataError(
            f"{path}: labels must be integers of shape (N,), got {labels.dtype} {labels.shape}{redo}"
        )
    if len(labels) != len(images) or split.source_rows.shape != labels.shape:
        raise DataError(
            f"{path}: {len(images)} images but {len(labels)} labels and {len(split.source_rows)} source "
            f"rows{redo}"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(
            f"{path}: label {labels[bad[0]]} at row {bad[0]} is outside 0..{NUM_CLASSES - 1} "
            f"({bad.size} such label(s)){redo}"
        )
    return split


def load_processed(directory: Path) -> dict[str, ArraySplit]:
    return {name: load_split(Path(directory) / f"{name}.npz") for name in PROCESSED_SPLITS}


def write_parquet_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write (N, 32, 32, 3) uint8 images and labels as Parquet in the uoft-cs/cifar10 schema (PNG bytes).

    The schema and its metadata come from ``datasets``' own Image and ClassLabel features, so the file reads
    like the Hub's; labels are written as given (validation, not the writer, judges them)."""
    from datasets import ClassLabel, Features
    from datasets import Image as ImageFeature

    def png(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    features = Features({"img": ImageFeature(), "label": ClassLabel(names=list(CLASS_NAMES))})
    table = pa.table(
        {"img": [{"bytes": png(image), "path": None} for image in images], "label": labels.astype(np.int64)},
        schema=features.arrow_schema,
    )
    pq.write_table(table, path)
