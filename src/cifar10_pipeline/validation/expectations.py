"""Great Expectations suites for CIFAR-10, defined in code.

Each split becomes a few small pandas tables, each with its own ExpectationSuite:

  <split>.shards   one row per Parquet file: readable in the uoft-cs/cifar10 schema, ClassLabel names
  <split>.images   one row per image: label, decodes, height/width/channels/dtype, content hash, duplicates
  <split>.classes  one row per class: image count (exact balance on full splits)
  <split>.pixels   one row: per-channel pixel mean and std, bounded by the data card

The suites run in an ephemeral GE context (in-memory stores), so nothing is written except the Data Docs
site a caller asks for. Every failed expectation becomes one line,
``<stage>: <split>: <check>: observed <x>, expected <y>``, collected in a ``DataValidationError``.

``check_processed_splits`` checks the preprocess stage's train/val/test arrays with plain numpy (eleven facts
about three arrays need no suites or Data Docs), reporting failures in the same line format.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cifar10_pipeline import CLASS_NAMES, IMAGE_SHAPE, NUM_CLASSES
from cifar10_pipeline.core.data import (
    SPLITS,
    ArraySplit,
    DataError,
    decode_image,
    read_raw_shard,
    split_files,
)
from cifar10_pipeline.core.paths import DATA_SOURCE

if TYPE_CHECKING:
    from great_expectations.data_context import EphemeralDataContext
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
# Every table's index is named this; GE reports offending rows by it, so it must read well in a message.
INDEX = "item"
DOCS_SITE = "cifar10"
MAX_LISTED = 5
# Re-fetching cannot help when the source itself is bad (a corrupt mirror verifies against its own sums only
# if they were written after the damage), so the hint also names where to check it.
FETCH_HINT = (
    "re-fetch the data: dvc repro download; if that brings the same bad data, the source itself is bad: "
    "check the mirror's files against their checksums (sha256sum -c SHA256SUMS in download.mirror_dir) or "
    f"the source named in {DATA_SOURCE}, and restore it from its origin"
)


class DataValidationError(DataError):
    """One or more expectations failed; ``failures`` holds one line per failed expectation."""

    def __init__(self, failures: Sequence[str], summary: dict[str, Any] | None = None):
        self.failures = list(failures)
        self.summary = summary
        super().__init__("\n".join(self.failures))


@dataclass
class TableCheck:
    """A pandas table and the expectations it must meet; becomes one suite named ``<split>.<table>``."""

    split: str
    table: str
    frame: pd.DataFrame
    expectations: list[Expectation]


@dataclass
class CheckReport:
    failures: list[str] = field(default_factory=list)
    # split -> {"evaluated": n, "failed": n}
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, Any]:
        """{"success", "evaluated", "failed"} overall, plus the same for each split."""
        out: dict[str, Any] = {
            "success": self.success,
            "evaluated": sum(c["evaluated"] for c in self.counts.values()),
            "failed": sum(c["failed"] for c in self.counts.values()),
        }
        for split, counts in self.counts.items():
            out[split] = {"success": counts["failed"] == 0, **counts}
        return out


def content_hash(image: np.ndarray) -> str:
    """sha256 of the decoded pixels, dtype and shape included (equal bytes in another shape differ)."""
    digest = hashlib.sha256(f"{image.dtype.str}{image.shape}".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


# --- Great Expectations plumbing -------------------------------------------------------------------------


def _expect(kind: str, check: str, expected: str, **kwargs: Any) -> Expectation:
    """Build ``gx.expectations.<kind>`` with what a failure message needs in ``meta``.

    meta keys: ``check`` and ``expected`` (the message), ``unit`` (what one row is), ``detail`` (a column
    whose value explains an offending row), ``hide_value`` (the detail says it all), ``flagged`` (a boolean
    column whose true rows a sum expectation counts; they are listed in the message), ``scalar`` (one-row
    table: report just the value).
    """
    import great_expectations as gx

    meta_keys = ("unit", "detail", "hide_value", "flagged", "scalar")
    meta = {"check": check, "expected": expected} | {k: kwargs.pop(k) for k in meta_keys if k in kwargs}
    return getattr(gx.expectations, kind)(meta=meta, description=f"{check}: expected {expected}", **kwargs)


def _context(docs_dir: Path | None) -> EphemeralDataContext:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites: dict[str, Any] = {}
    if docs_dir is not None:
        sites[DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(docs_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    # Explicit config: the default ephemeral context would also build a docs site in a temp folder.
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_checks(checks: Sequence[TableCheck], stage: str, docs_dir: Path | None = None) -> CheckReport:
    """Validate every table with its suite; build Data Docs into ``docs_dir`` only if all of them pass."""
    import great_expectations as gx

    context = _context(docs_dir)
    source = context.data_sources.add_pandas("cifar10")
    run_id = gx.RunIdentifier(run_name=stage)
    report = CheckReport()
    for check in checks:
        name = f"{check.split}.{check.table}"
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all rows")
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in check.expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": check.frame}, result_format="SUMMARY", run_id=run_id
        )
        counts = report.counts.setdefault(check.split, {"evaluated": 0, "failed": 0})
        counts["evaluated"] += result.statistics["evaluated_expectations"]
        counts["failed"] += result.statistics["unsuccessful_expectations"]
        for outcome in result.results:
            if not outcome.success:
                report.failures.append(_failure_line(stage, check, outcome))
    if docs_dir is not None and report.success:
        context.build_data_docs(site_names=[DOCS_SITE])
    return report


# --- failure messages ------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    """A value from a GE result: numpy scalars print as plain numbers, pandas' NA and NaN as "null"."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "null"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _listed(items: list[str], total: int) -> str:
    more = f", ... ({total - MAX_LISTED} more)" if total > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _exception_message(outcome: Any) -> str | None:
    """The first line of an error GE caught: its exception_info is one ExceptionInfo-shaped dict, or one such
    dict per failed metric when a metric could not be computed."""
    info = outcome.exception_info or {}
    for entry in [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]:
        if entry.get("raised_exception"):
            return str(entry.get("exception_message")).splitlines()[0]
    return None


def _observed(outcome: Any, meta: Mapping[str, Any], frame: pd.DataFrame) -> str:
    """What a failed expectation saw, from the three result shapes the suites' expectation kinds produce."""
    result = outcome.result or {}
    unit = meta.get("unit", "rows")
    detail = meta.get("detail")
    error = _exception_message(outcome)
    if error is not None:
        return f"an error while checking ({error})"
    if "partial_missing_list" in result:  # distinct values vs a set
        parts = []
        for key, word in (("partial_missing_list", "missing"), ("partial_unexpected_list", "unexpected")):
            if result.get(key):
                parts.append(f"{word} {', '.join(_fmt(v) for v in sorted(result[key]))}")
        return "; ".join(parts)
    if "unexpected_count" in result:  # per-row expectations; the index list holds {INDEX: row, column: value}
        values = result["partial_unexpected_list"]
        if meta.get("scalar") and len(values) == 1:
            return _fmt(values[0])
        entries = []
        for where, value in zip(result["partial_unexpected_index_list"], values, strict=False):
            item = where[INDEX]
            text = f"{item}" if meta.get("hide_value") else f"{item}: {_fmt(value)}"
            entries.append(f"{text} ({frame.at[item, detail]})" if detail else text)
        listed = _listed(entries, result["unexpected_count"])
        return f"{result['unexpected_count']} of {result['element_count']} {unit}: {listed}"
    value = result.get("observed_value")  # row counts and sums
    text = f"{_fmt(value)} {unit.removesuffix('s') if value == 1 else unit}"  # "1 image", "1 shard"
    flagged = meta.get("flagged")
    if flagged and value:
        rows = frame.index[frame[flagged].astype(bool)]
        entries = [f"{row} ({frame.at[row, detail]})" if detail else str(row) for row in rows]
        text += f": {_listed(entries, len(entries))}"
    return text


def _failure_line(stage: str, check: TableCheck, outcome: Any) -> str:
    meta = outcome.expectation_config.meta or {}
    name = meta.get("check", outcome.expectation_config.type)
    observed = _observed(outcome, meta, check.frame)
    return f"{stage}: {check.split}: {name}: observed {observed}, expected {meta.get('expected', '?')}"


# --- raw splits ------------------------------------------------------------------------------------------


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


def raw_split_checks(
    profile: RawSplitProfile, expected_size: int, params: ValidateParams, raw_dir: Path
) -> list[TableCheck]:
    """The suites of one raw split. Exact counts: ``expected_size`` (params.yaml validate.<split>_images, a
    multiple of the classes, checked on load) and an equal share of it for every class."""
    split = profile.split
    per_class = expected_size // NUM_CLASSES
    known_duplicates = getattr(params, f"known_duplicates_{split}", 0)

    shards = [
        _expect(
            "ExpectTableRowCountToBeBetween",
            "Parquet shards present",
            f"at least 1 {split}-*.parquet file in {raw_dir}; {FETCH_HINT}",
            min_value=1,
            unit="shards",
        ),
        _expect(
            "ExpectColumnValuesToBeInSet",
            "Parquet shard readable",
            f"every shard readable in the uoft-cs/cifar10 schema (img.bytes, integer label); {FETCH_HINT}",
            column="readable",
            value_set=[True],
            unit="shards",
            detail="error",
            hide_value=True,
        ),
        _expect(
            "ExpectColumnValuesToBeInSet",
            "ClassLabel names",
            f"ClassLabel names {json.dumps(list(CLASS_NAMES))} (cifar10_pipeline.CLASS_NAMES)",
            column="class_names",
            value_set=[json.dumps(list(CLASS_NAMES))],
            unit="shards",
        ),
    ]

    one_image = "every image"
    images = [
        _expect(
            "ExpectTableRowCountToEqual",
            "row count",
            f"{expected_size} images (params.yaml validate.{split}_images); {FETCH_HINT}",
            value=expected_size,
            unit="images",
        ),
        _expect(
            "ExpectColumnValuesToNotBeNull",
            "label not null",
            "a label on every image",
            column="label",
            unit="images",
        ),
        _expect(
            "ExpectColumnValuesToBeInSet",
            "label range",
            f"labels in 0..{NUM_CLASSES - 1}",
            column="label",
            value_set=LABELS,
            unit="images",
        ),
        _expect(
            "ExpectColumnDistinctValuesToEqualSet",
            "label set",
            f"exactly the labels 0..{NUM_CLASSES - 1}, each class present",
            column="label",
            value_set=LABELS,
        ),
        _expect(
            "ExpectColumnValuesToBeInSet",
            "image decodes",
            f"{one_image} a decodable PNG; {FETCH_HINT}",
            column="decodes",
            value_set=[True],
            unit="images",
            detail="decode_error",
            hide_value=True,
        ),
        _expect(
            "ExpectColumnValuesToBeInSet",
            "image height",
            f"{IMAGE_SHAPE[0]} pixels for {one_image}",
            column="height",
            value_set=[IMAGE_SHAPE[0]],
            unit="images",
        ),
        _expect(
            "ExpectColumnValuesToBeInSet",
            "image width",
            f"{IMAGE_SHAPE[1]} pixels for {one_image}",
            column="width",
            value_set=[IMAGE_SHAPE[1]],
            unit="images",
        ),
        _expect(
            "ExpectColumnValuesToBeInSet",
            "image channels",
            f"{IMAGE_SHAPE[2]} (RGB) for {one_image}; convert grey-scale or RGBA images to RGB",
            column="channels",
            value_set=[IMAGE_SHAPE[2]],
            unit="images",
            detail="mode",
        ),
        _expect(
            "ExpectColumnValuesToBeInSet",
            "image dtype",
            f"uint8 (8-bit) pixels for {one_image}",
            column="dtype",
            value_set=["uint8"],
            unit="images",
        ),
        _expect(
            "ExpectColumnSumToBeBetween",
            "duplicate images",
            f"at most {known_duplicates} (params.yaml validate.known_duplicates_{split})",
            column="duplicate",
            min_value=0,
            max_value=known_duplicates,
            unit="images",
            flagged="duplicate",
            detail="duplicate_of",
        ),
    ]
    if "in_train" in profile.images:
        known = params.known_train_test_overlap
        images.append(
            _expect(
                "ExpectColumnSumToBeBetween",
                "train/test overlap",
                f"at most {known} test images also in train (params.yaml validate.known_train_test_overlap)",
                column="in_train",
                min_value=0,
                max_value=known,
                unit="images",
                flagged="in_train",
                detail="train_match",
            )
        )

    counts = profile.images["label"].value_counts().reindex(LABELS, fill_value=0)
    classes = pd.DataFrame(
        {"label": LABELS, "count": counts.to_numpy().astype(np.int64)},
        index=pd.Index(
            [f"{name} ({label})" for label, name in enumerate(CLASS_NAMES)], name=INDEX, dtype="str"
        ),
    )
    classes["share"] = classes["count"] / max(int(classes["count"].sum()), 1)
    class_checks = [
        _expect(
            "ExpectColumnValuesToBeBetween",
            "class balance",
            f"exactly {per_class} images per class (full split of {expected_size})",
            column="count",
            min_value=per_class,
            max_value=per_class,
            unit="classes",
        )
    ]

    card = DATA_CARD_CHANNEL_STATS.get(split)
    stats = {
        f"{stat}_{name}": [value]
        for stat in ("mean", "std")
        for name, value in zip(
            CHANNELS, profile.channel_mean if stat == "mean" else profile.channel_std, strict=True
        )
    }
    pixels = pd.DataFrame(stats, index=pd.Index([split], name=INDEX, dtype="str"))
    tolerance = params.channel_stat_tolerance
    pixel_checks = []
    if card is not None:
        for stat in ("mean", "std"):
            for name, reference in zip(CHANNELS, card[stat], strict=True):
                pixel_checks.append(
                    _expect(
                        "ExpectColumnValuesToBeBetween",
                        f"{name} channel {stat}",
                        f"{reference:.4f} ± {tolerance} (data card, pixel/255)",
                        column=f"{stat}_{name}",
                        min_value=round(reference - tolerance, 6),
                        max_value=round(reference + tolerance, 6),
                        unit="splits",
                        scalar=True,
                    )
                )
    return [
        TableCheck(split, "shards", profile.shards, shards),
        TableCheck(split, "images", profile.images, images),
        TableCheck(split, "classes", classes, class_checks),
        TableCheck(split, "pixels", pixels, pixel_checks),
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


# --- processed arrays ------------------------------------------------------------------------------------
# Plain numpy: facts about three arrays the pipeline made itself need no suites, and get no Data Docs.

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
            observed = f"{len(entries)} of {totals[unit]} {unit}: {_listed(entries, len(entries))}"
            failures.append(f"preprocess: processed: {check}: observed {observed}, expected {expected}")
    summary = CheckReport(
        failures, {"processed": {"evaluated": len(found), "failed": len(failures)}}
    ).summary()
    summary["images"] = {name: len(split) for name, split in splits.items()}
    summary["test_images_in_train_val"] = len(found["test images in train/val"])
    if failures:
        raise DataValidationError(failures, summary)
    return summary
