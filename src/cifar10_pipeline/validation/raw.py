"""The raw splits' Great Expectations suites: each split profiled into small pandas tables, and each table's
suite written as a table of checks.

  <split>.shards   one row per Parquet file: readable in the uoft-cs/cifar10 schema, ClassLabel names
  <split>.images   one row per image: label, decodes, height/width/channels/dtype, content hash, duplicates
  <split>.classes  one row per class: image count (exact balance on full splits)
  <split>.pixels   one row: per-channel pixel mean and std, bounded by the data card

validation/ge.py runs the suites and turns every failed expectation into one line,
``validate: <split>: <check>: observed <x>, expected <y>``, collected in a ``DataValidationError``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cifar10_pipeline import CLASS_NAMES, IMAGE_SHAPE, NUM_CLASSES
from cifar10_pipeline.core.data import SPLITS, DataError, decode_image, read_raw_shard, split_files
from cifar10_pipeline.core.paths import DATA_SOURCE
from cifar10_pipeline.validation.common import DataValidationError, content_hash
from cifar10_pipeline.validation.ge import INDEX, TableCheck, expect, run_checks

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

    from cifar10_pipeline.core.params import ValidateParams

# Per-channel statistics (RGB, pixel/255) from the mirror's data card, ../shared/data/cifar10/README.md.
# The tolerance around them is params.yaml validate.channel_stat_tolerance.
DATA_CARD_CHANNEL_STATS: dict[str, dict[str, tuple[float, float, float]]] = {
    "train": {"mean": (0.4913, 0.4821, 0.4465), "std": (0.2452, 0.2428, 0.2606)},
    "test": {"mean": (0.4941, 0.4851, 0.4504), "std": (0.2448, 0.2422, 0.2606)},
}
CHANNELS = ("red", "green", "blue")
LABELS = list(range(NUM_CLASSES))
# Re-fetching cannot help when the source itself is bad (a corrupt mirror verifies against its own sums only
# if they were written after the damage), so the hint also names where to check it.
FETCH_HINT = (
    "re-fetch the data: dvc repro download; if that brings the same bad data, the source itself is bad: "
    "check the mirror's files against their checksums (sha256sum -c SHA256SUMS in download.mirror_dir) or "
    f"the source named in {DATA_SOURCE}, and restore it from its origin"
)


# --- profiling -------------------------------------------------------------------------------------------


@dataclass
class RawSplitProfile:
    """A raw split measured for validation: its shards, one row per image, and its pixel statistics."""

    split: str
    shards: pd.DataFrame
    images: pd.DataFrame
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]


def _class_names(schema: pa.Schema) -> str:
    """The label's ClassLabel names from the huggingface schema metadata, as JSON (or why there are none)."""
    from datasets import ClassLabel, Features

    try:
        feature = Features.from_arrow_schema(schema).get("label")
    except Exception as exc:  # malformed metadata: report it instead of crashing
        return f"<unreadable huggingface metadata: {type(exc).__name__}: {exc}>"
    if not isinstance(feature, ClassLabel):
        return "<no ClassLabel metadata on 'label'>"
    return json.dumps(feature.names)


def _read_shards(raw_dir: Path, split: str) -> tuple[pd.DataFrame, list[bytes | None], list[int | None]]:
    """Read every readable shard of ``split``; the shard table records what is wrong with the others."""
    try:
        paths = split_files(raw_dir, split)
    except DataError:  # no shards: the "Parquet shards present" expectation reports it
        paths = []
    rows, image_bytes, labels = [], [], []
    for path in paths:
        try:
            table, error = read_raw_shard(path), None
        except DataError as exc:
            table, error = None, str(exc)
        if table is not None and not pa.types.is_integer(label_type := table.schema.field("label").type):
            # The reader leaves label types to its callers; the schema this suite checks says integers.
            table, error = None, f"{path}: column 'label' is {label_type}, expected an integer type"
        if table is not None:
            image_bytes.extend(table.column("image_bytes").to_pylist())
            labels.extend(table.column("label").to_pylist())
        rows.append(
            {
                INDEX: path.name,
                "readable": table is not None,
                "error": error,
                "rows": 0 if table is None else table.num_rows,
                "class_names": None if table is None else _class_names(pq.read_schema(path)),
            }
        )
    columns = {INDEX: "str", "readable": "bool", "error": "object", "rows": "int64", "class_names": "object"}
    shards = pd.DataFrame(rows, columns=list(columns)).astype(columns).set_index(INDEX)
    return shards, image_bytes, labels


def profile_raw_split(raw_dir: Path, split: str) -> RawSplitProfile:
    """Decode and measure every image of a raw split, one row each; bad images are recorded, not raised."""
    shards, image_bytes, labels = _read_shards(raw_dir, split)
    records: list[dict[str, Any]] = []
    sums = np.zeros(3)
    squares = np.zeros(3)
    well_formed = 0
    for data in image_bytes:
        try:
            image, mode = decode_image(data)
        except DataError as exc:
            records.append({"decodes": False, "decode_error": str(exc)})
            continue
        record: dict[str, Any] = {
            "decodes": True,
            "height": image.shape[0],
            "width": image.shape[1] if image.ndim > 1 else 1,
            "channels": image.shape[2] if image.ndim == 3 else 1,
            "dtype": image.dtype.name,
            "mode": f"PIL mode {mode}",
            "sha256": content_hash(image),
        }
        if image.shape == IMAGE_SHAPE and image.dtype == np.uint8:  # statistics only over well-formed images
            pixels = image.reshape(-1, 3).astype(np.float64) / 255.0
            channel_means = pixels.mean(axis=0)
            record.update({f"mean_{name}": channel_means[c] for c, name in enumerate(CHANNELS)})
            sums += channel_means
            squares += (pixels * pixels).mean(axis=0)
            well_formed += 1
        records.append(record)
    columns = {
        "decodes": "bool",
        "decode_error": "object",
        # nullable: rows that do not decode stay out of the shape checks ("image decodes" reports them)
        "height": "Int64",
        "width": "Int64",
        "channels": "Int64",
        "dtype": "object",
        "mode": "object",
        "sha256": "object",
        **{f"mean_{name}": "float64" for name in CHANNELS},
    }
    index = pd.Index([f"row {row}" for row in range(len(records))], name=INDEX, dtype="str")
    images = pd.DataFrame.from_records(records, columns=list(columns)).astype(columns).set_axis(index)
    images.insert(0, "label", pd.array(labels, dtype="Int64"))
    # A duplicate is a row whose pixels equal an earlier row's; rows that do not decode are never duplicates.
    hashes = images["sha256"]
    images["duplicate"] = hashes.duplicated(keep="first") & hashes.notna()
    first_row = images.reset_index().dropna(subset=["sha256"]).groupby("sha256")[INDEX].first()
    images["duplicate_of"] = ("same pixels as " + hashes.map(first_row).astype("object")).where(
        images["duplicate"]
    )
    if well_formed:
        mean = sums / well_formed
        std = np.sqrt(np.maximum(squares / well_formed - mean**2, 0.0))
    else:
        mean = std = np.full(3, np.nan)
    return RawSplitProfile(split, shards, images, tuple(mean.tolist()), tuple(std.tolist()))


def _mark_train_overlap(images: pd.DataFrame, train: pd.DataFrame) -> None:
    """Flag test rows whose pixels also occur in the training split."""
    train_rows = train.reset_index().dropna(subset=["sha256"]).groupby("sha256")[INDEX].first()
    match = images["sha256"].map(train_rows)
    images["in_train"] = match.notna() & images["sha256"].notna()
    images["train_match"] = ("same pixels as train " + match.astype("object")).where(images["in_train"])


# --- suites ----------------------------------------------------------------------------------------------
# A suite is a table of checks, one row per expectation: (check, GE expectation kind, expected, arguments).
# The arguments go to the expectation, but for the meta keys that ge.expect keeps for the failure line:
# ``unit`` (what one row of the table is: the suite's unless a row names another, None for none), ``detail``,
# ``hide_value``, ``flagged`` and ``scalar``.

Check = tuple[str, str, str, dict[str, Any]]
ROWS_BETWEEN = "ExpectTableRowCountToBeBetween"
ROWS_EQUAL = "ExpectTableRowCountToEqual"
NOT_NULL = "ExpectColumnValuesToNotBeNull"
IN_SET = "ExpectColumnValuesToBeInSet"
DISTINCT_SET = "ExpectColumnDistinctValuesToEqualSet"
BETWEEN = "ExpectColumnValuesToBeBetween"
SUM_BETWEEN = "ExpectColumnSumToBeBetween"
EVERY_IMAGE = "every image"
# The image shape, one check per dimension: (column, size, what the size counts, advice, more arguments).
SHAPE_CHECKS = (
    ("height", IMAGE_SHAPE[0], "pixels", "", {}),
    ("width", IMAGE_SHAPE[1], "pixels", "", {}),
    ("channels", IMAGE_SHAPE[2], "(RGB)", "; convert grey-scale or RGBA images to RGB", {"detail": "mode"}),
)


def shard_checks(split: str, raw_dir: Path) -> list[Check]:
    names = json.dumps(list(CLASS_NAMES))
    schema = "the uoft-cs/cifar10 schema (img.bytes, integer label)"
    files = f"{split}-*.parquet file in {raw_dir}"
    return [
        ("Parquet shards present", ROWS_BETWEEN, f"at least 1 {files}; {FETCH_HINT}", {"min_value": 1}),
        ("Parquet shard readable", IN_SET, f"every shard readable in {schema}; {FETCH_HINT}",
         {"column": "readable", "value_set": [True], "detail": "error", "hide_value": True}),
        ("ClassLabel names", IN_SET, f"ClassLabel names {names} (cifar10_pipeline.CLASS_NAMES)",
         {"column": "class_names", "value_set": [names]}),
    ]  # fmt: skip


def image_checks(
    split: str, expected_size: int, known_duplicates: int, known_overlap: int | None
) -> list[Check]:
    """``known_overlap``: how many test images may also be in train (None: no overlap column, as in train)."""
    labels = f"0..{NUM_CLASSES - 1}"
    checks: list[Check] = [
        ("row count", ROWS_EQUAL,
         f"{expected_size} images (params.yaml validate.{split}_images); {FETCH_HINT}",
         {"value": expected_size}),
        ("label not null", NOT_NULL, "a label on every image", {"column": "label"}),
        ("label range", IN_SET, f"labels in {labels}", {"column": "label", "value_set": LABELS}),
        ("label set", DISTINCT_SET, f"exactly the labels {labels}, each class present",
         {"column": "label", "value_set": LABELS, "unit": None}),
        ("image decodes", IN_SET, f"{EVERY_IMAGE} a decodable PNG; {FETCH_HINT}",
         {"column": "decodes", "value_set": [True], "detail": "decode_error", "hide_value": True}),
        *[(f"image {column}", IN_SET, f"{size} {counts} for {EVERY_IMAGE}{advice}",
           {"column": column, "value_set": [size], **more})
          for column, size, counts, advice, more in SHAPE_CHECKS],
        ("image dtype", IN_SET, f"uint8 (8-bit) pixels for {EVERY_IMAGE}",
         {"column": "dtype", "value_set": ["uint8"]}),
        ("duplicate images", SUM_BETWEEN,
         f"at most {known_duplicates} (params.yaml validate.known_duplicates_{split})",
         {"column": "duplicate", "min_value": 0, "max_value": known_duplicates, "flagged": "duplicate",
          "detail": "duplicate_of"}),
    ]  # fmt: skip
    if known_overlap is not None:
        checks.append(
            ("train/test overlap", SUM_BETWEEN,
             f"at most {known_overlap} test images also in train "
             "(params.yaml validate.known_train_test_overlap)",
             {"column": "in_train", "min_value": 0, "max_value": known_overlap, "flagged": "in_train",
              "detail": "train_match"}),
        )  # fmt: skip
    return checks


def class_checks(expected_size: int) -> list[Check]:
    per_class = expected_size // NUM_CLASSES
    return [
        ("class balance", BETWEEN, f"exactly {per_class} images per class (full split of {expected_size})",
         {"column": "count", "min_value": per_class, "max_value": per_class}),
    ]  # fmt: skip


def pixel_checks(split: str, tolerance: float) -> list[Check]:
    """The data card's per-channel statistics, where it has them for ``split``."""
    card = DATA_CARD_CHANNEL_STATS.get(split)
    if card is None:
        return []
    return [
        (f"{name} channel {stat}", BETWEEN, f"{reference:.4f} ± {tolerance} (data card, pixel/255)",
         {"column": f"{stat}_{name}", "min_value": round(reference - tolerance, 6),
          "max_value": round(reference + tolerance, 6), "scalar": True})
        for stat in ("mean", "std")
        for name, reference in zip(CHANNELS, card[stat], strict=True)
    ]  # fmt: skip


def _suite(checks: list[Check], unit: str) -> list[Expectation]:
    """The table's expectations, ``unit`` (what one of its rows is) given to every check that names none."""
    expectations = []
    for check, kind, expected, arguments in checks:
        arguments = {"unit": unit} | arguments
        if arguments["unit"] is None:
            del arguments["unit"]
        expectations.append(expect(kind, check, expected, **arguments))
    return expectations


def _class_table(images: pd.DataFrame) -> pd.DataFrame:
    """One row per class: its image count and share of the split."""
    counts = images["label"].value_counts().reindex(LABELS, fill_value=0)
    classes = pd.DataFrame(
        {"label": LABELS, "count": counts.to_numpy().astype(np.int64)},
        index=pd.Index(
            [f"{name} ({label})" for label, name in enumerate(CLASS_NAMES)], name=INDEX, dtype="str"
        ),
    )
    classes["share"] = classes["count"] / max(int(classes["count"].sum()), 1)
    return classes


def _pixel_table(profile: RawSplitProfile) -> pd.DataFrame:
    """One row: the split's per-channel pixel means and stds."""
    stats = {
        f"{stat}_{name}": [value]
        for stat in ("mean", "std")
        for name, value in zip(
            CHANNELS, profile.channel_mean if stat == "mean" else profile.channel_std, strict=True
        )
    }
    return pd.DataFrame(stats, index=pd.Index([profile.split], name=INDEX, dtype="str"))


def raw_split_checks(
    profile: RawSplitProfile, expected_size: int, params: ValidateParams, raw_dir: Path
) -> list[TableCheck]:
    """The suites of one raw split. Exact counts: ``expected_size`` (params.yaml validate.<split>_images, a
    multiple of the classes, checked on load) and an equal share of it for every class."""
    split = profile.split
    known_duplicates = getattr(params, f"known_duplicates_{split}", 0)
    known_overlap = params.known_train_test_overlap if "in_train" in profile.images else None
    images = image_checks(split, expected_size, known_duplicates, known_overlap)
    return [
        TableCheck(split, "shards", profile.shards, _suite(shard_checks(split, raw_dir), "shards")),
        TableCheck(split, "images", profile.images, _suite(images, "images")),
        TableCheck(
            split, "classes", _class_table(profile.images), _suite(class_checks(expected_size), "classes")
        ),
        TableCheck(
            split,
            "pixels",
            _pixel_table(profile),
            _suite(pixel_checks(split, params.channel_stat_tolerance), "splits"),
        ),
    ]


def check_raw_splits(
    raw_dir: Path,
    params: ValidateParams,
    docs_dir: Path | None = None,
) -> dict[str, Any]:
    """Validate the raw train and test splits; return the summary or raise ``DataValidationError``.

    Data Docs are built into ``docs_dir`` (when given) only if every expectation passes.
    """
    profiles: dict[str, RawSplitProfile] = {}
    for split in SPLITS:
        started = time.perf_counter()
        profiles[split] = profile_raw_split(raw_dir, split)
        seconds = time.perf_counter() - started
        print(f"validate: {split}: {len(profiles[split].images)} images measured in {seconds:.1f} s")
    _mark_train_overlap(profiles["test"].images, profiles["train"].images)
    checks = [
        check
        for split in SPLITS
        for check in raw_split_checks(profiles[split], params.split_sizes()[split], params, Path(raw_dir))
    ]
    report = run_checks(checks, "validate", docs_dir)
    summary = report.summary()
    for split, profile in profiles.items():
        images = profile.images
        summary.setdefault(split, {}).update(
            {
                "images": len(images),
                "shards": len(profile.shards),
                "duplicates": int(images["duplicate"].sum()),
                "channel_mean": dict(zip(CHANNELS, _rounded(profile.channel_mean), strict=True)),
                "channel_std": dict(zip(CHANNELS, _rounded(profile.channel_std), strict=True)),
            }
        )
    summary["test"]["train_overlap"] = int(profiles["test"].images["in_train"].sum())
    if not report.success:
        raise DataValidationError(report.failures, summary)
    return summary


def _rounded(values: Sequence[float]) -> list[float | None]:
    return [None if np.isnan(v) else round(float(v), 6) for v in values]
