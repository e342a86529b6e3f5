"""The validate stage and the processed-array checks on small synthetic fixtures (uoft-cs/cifar10 schema).

Each failure test corrupts a good fixture in exactly one way and checks that the stage names it in one line,
``validate: <split>: <check>: observed <x>, expected <y>``, and leaves no outputs behind.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cifar10_pipeline import CLASS_NAMES, NUM_CLASSES
from cifar10_pipeline.core.data import ArraySplit, DataError, write_parquet_split
from cifar10_pipeline.core.params import ValidateParams, load_params
from cifar10_pipeline.stages.validate import main, validate
from cifar10_pipeline.validation.common import DataValidationError
from cifar10_pipeline.validation.ge import INDEX, TableCheck, expect, run_checks
from cifar10_pipeline.validation.processed import check_processed_splits
from cifar10_pipeline.validation.raw import DATA_CARD_CHANNEL_STATS

from ..conftest import PROJECT_ROOT
from ..support.helpers import write_params

SIZES = {"train": 20, "test": 10}
PARAMS = ValidateParams(
    class_share_tolerance=0.02,
    channel_stat_tolerance=0.01,
    known_duplicates_train=0,
    known_duplicates_test=0,
    known_train_test_overlap=0,
    train_images=SIZES["train"],
    test_images=SIZES["test"],
)
LINE = re.compile(r"^validate: (train|test): [^:]+: observed .+, expected .+$")
PROCESSED_LINE = re.compile(r"^preprocess: processed: [^:]+: observed \d+ of \d+ [a-z/ ]+: .+, expected .+$")


def card_like_images(n: int, split: str, seed: int) -> np.ndarray:
    """Random images whose channel means and stds match the data card (uniform noise of that mean and std)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    card = DATA_CARD_CHANNEL_STATS[split]
    for c, (mean, std) in enumerate(zip(card["mean"], card["std"], strict=True)):
        half_width = std * 3**0.5  # a uniform distribution's std is its width / sqrt(12)
        low, high = round((mean - half_width) * 255), round((mean + half_width) * 255)
        images[..., c] = rng.integers(low, high + 1, size=(n, 32, 32))
    return images


def shard(raw_dir: Path, split: str) -> Path:
    return raw_dir / f"{split}-00000-of-00001.parquet"


@pytest.fixture(scope="module")
def good_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("good_raw")
    for seed, (split, size) in enumerate(SIZES.items()):
        images = card_like_images(size, split, seed)
        write_parquet_split(shard(directory, split), images, np.arange(size) % NUM_CLASSES)
    return directory


@pytest.fixture
def raw_dir(good_shards: Path, tmp_path: Path) -> Path:
    """A fresh copy of the good fixture (20 train, 10 test images, balanced) for one test to corrupt."""
    directory = tmp_path / "raw"
    directory.mkdir()
    for path in good_shards.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    return directory


def outputs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "reports" / "data_docs", tmp_path / "metrics" / "validation.json"


def run_validate(raw_dir: Path, tmp_path: Path, sizes: dict[str, int] = SIZES) -> dict:
    docs, metrics = outputs(tmp_path)
    params = PARAMS.model_copy(update={"train_images": sizes["train"], "test_images": sizes["test"]})
    return validate(params, raw_dir=raw_dir, docs_dir=docs, metrics_file=metrics)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def rewrite(
    path: Path, images: dict[int, bytes] | None = None, labels: dict[int, int | None] | None = None
) -> None:
    """Replace some rows' PNG bytes and/or labels in place, keeping the schema and huggingface metadata."""
    table = pq.read_table(path)
    rows = table.column("img").to_pylist()
    for row, data in (images or {}).items():
        rows[row] = {"bytes": data, "path": None}
    values = table.column("label").to_pylist()
    for row, label in (labels or {}).items():
        values[row] = label
    pq.write_table(pa.table({"img": rows, "label": values}, schema=table.schema), path)


def image_bytes(path: Path, row: int) -> bytes:
    return pq.read_table(path).column("img")[row]["bytes"].as_py()


# --- one corruption each ---------------------------------------------------------------------------------


def duplicate_image(raw: Path) -> None:
    path = shard(raw, "train")
    rewrite(path, images={15: image_bytes(path, 5)})  # same class, so only the duplicate check can object


def train_test_overlap(raw: Path) -> None:
    rewrite(shard(raw, "test"), images={3: image_bytes(shard(raw, "train"), 3)})


def missing_class(raw: Path) -> None:
    rewrite(shard(raw, "train"), labels={9: 8, 19: 8})


def wrong_shape(raw: Path) -> None:
    rewrite(shard(raw, "train"), images={4: png(card_like_images(1, "train", 9)[0][:, :28])})


def grey_scale(raw: Path) -> None:
    rewrite(shard(raw, "train"), images={6: png(np.full((32, 32), 128, dtype=np.uint8))})


def rgba(raw: Path) -> None:
    rewrite(shard(raw, "test"), images={2: png(np.full((32, 32, 4), 128, dtype=np.uint8))})


def corrupt_png(raw: Path) -> None:
    path = shard(raw, "train")
    rewrite(path, images={7: image_bytes(path, 7)[:60]})  # a valid header, then nothing


def label_ten(raw: Path) -> None:
    rewrite(shard(raw, "train"), labels={2: 10})


def null_label(raw: Path) -> None:
    rewrite(shard(raw, "test"), labels={3: None})


def truncated_file(raw: Path) -> None:
    path = shard(raw, "train")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def wrong_class_names(raw: Path) -> None:
    path = shard(raw, "test")
    table = pq.read_table(path)
    names = json.dumps(list(reversed(CLASS_NAMES)))
    metadata = table.schema.metadata[b"huggingface"].decode().replace(json.dumps(list(CLASS_NAMES)), names)
    pq.write_table(table.replace_schema_metadata({"huggingface": metadata}), path)


def swapped_channels(raw: Path) -> None:
    path = shard(raw, "train")
    images = card_like_images(SIZES["train"], "train", 0)[..., ::-1]  # BGR instead of RGB
    write_parquet_split(path, np.ascontiguousarray(images), np.arange(SIZES["train"]) % NUM_CLASSES)


CORRUPTIONS: list[tuple[Callable[[Path], None], str]] = [
    (
        duplicate_image,
        r"validate: train: duplicate images: observed 1 image: row 15 \(same pixels as row 5\), ",
    ),
    (
        train_test_overlap,
        r"validate: test: train/test overlap: observed 1 image: row 3 \(same pixels as train row 3\)",
    ),
    (missing_class, r"validate: train: label set: observed missing 9, expected exactly the labels 0\.\.9"),
    (
        missing_class,
        r"validate: train: class balance: observed 2 of 10 classes: ship \(8\): 4, truck \(9\): 0, ",
    ),
    (wrong_shape, r"validate: train: image width: observed 1 of 20 images: row 4: 28, expected 32 pixels"),
    (
        grey_scale,
        r"validate: train: image channels: observed 1 of 20 images: row 6: 1 \(PIL mode L\), "
        r"expected 3 \(RGB\) for every image; convert grey-scale or RGBA images to RGB",
    ),
    (
        rgba,
        r"validate: test: image channels: observed 1 of 10 images: row 2: 4 \(PIL mode RGBA\), expected 3",
    ),
    (
        corrupt_png,
        r"validate: train: image decodes: observed 1 of 20 images: row 7 "
        r"\(image does not decode \(\w+: .+\)\), expected every image",
    ),
    (
        label_ten,
        r"validate: train: label range: observed 1 of 20 images: row 2: 10, expected labels in 0\.\.9",
    ),
    (null_label, r"validate: test: label not null: observed 1 of 10 images: row 3: null, expected a label"),
    (
        truncated_file,
        r"validate: train: Parquet shard readable: observed 1 of 1 shards: train-00000-of-00001\.parquet ",
    ),
    (
        wrong_class_names,
        r'validate: test: ClassLabel names: observed 1 of 1 shards: test-00000-of-00001\.parquet: \["truck"',
    ),
    (swapped_channels, r"validate: train: red channel mean: observed 0\.4[45]\d\d, expected 0\.4913 ± 0\.01"),
]


def test_good_fixture_passes_and_writes_docs_and_metrics(raw_dir: Path, tmp_path: Path) -> None:
    summary = run_validate(raw_dir, tmp_path)
    docs, metrics = outputs(tmp_path)
    assert summary["success"] and summary["failed"] == 0 and summary["evaluated"] > 30
    assert json.loads(metrics.read_text()) == summary
    for split in ("train", "test"):
        assert summary[split]["success"] and summary[split]["images"] == SIZES[split]
        assert summary[split]["duplicates"] == 0
    assert summary["test"]["train_overlap"] == 0
    assert (docs / "index.html").is_file()
    pages = {p.relative_to(docs).as_posix() for p in docs.rglob("*.html")}
    assert {
        f"expectations/{s}/{t}.html" for s in SIZES for t in ("shards", "images", "classes", "pixels")
    } <= pages
    # nothing but the declared outputs beside the fixture
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics", "raw", "reports"]
    assert sorted(p.name for p in metrics.parent.iterdir()) == ["validation.json"]


@pytest.mark.parametrize(
    ("corrupt", "message"), CORRUPTIONS, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(CORRUPTIONS)]
)
def test_corruption_fails_with_one_line_and_no_outputs(
    raw_dir: Path, tmp_path: Path, corrupt: Callable[[Path], None], message: str
) -> None:
    docs, metrics = outputs(tmp_path)
    docs.mkdir(parents=True)
    (docs / "index.html").write_text("stale")  # a previous run's outputs must not survive a failure
    metrics.parent.mkdir(parents=True)
    metrics.write_text("{}")
    corrupt(raw_dir)
    with pytest.raises(DataValidationError) as failure:
        run_validate(raw_dir, tmp_path)
    lines = str(failure.value).splitlines()
    assert lines == failure.value.failures
    assert all(LINE.match(line) for line in lines), lines
    assert any(re.match(message, line) for line in lines), "\n".join(lines)
    assert isinstance(failure.value, DataError)
    assert failure.value.summary is not None and failure.value.summary["failed"] == len(lines)
    assert not docs.exists() and not metrics.exists()


def test_the_committed_params_expect_the_full_splits(raw_dir: Path, tmp_path: Path) -> None:
    docs, metrics = outputs(tmp_path)
    committed = load_params(PROJECT_ROOT / "params.yaml").validation
    assert committed.split_sizes() == {"train": 50_000, "test": 10_000}  # CIFAR-10's
    with pytest.raises(DataValidationError) as failure:
        validate(committed, raw_dir=raw_dir, docs_dir=docs, metrics_file=metrics)
    assert "validate: train: row count: observed 20 images, expected 50000 images" in str(failure.value)
    assert not docs.exists() and not metrics.exists()


def test_known_duplicates_are_tolerated_but_not_more(raw_dir: Path, tmp_path: Path) -> None:
    duplicate_image(raw_dir)
    tolerant = PARAMS.model_copy(update={"known_duplicates_train": 1})
    docs, metrics = outputs(tmp_path)
    summary = validate(tolerant, raw_dir=raw_dir, docs_dir=docs, metrics_file=metrics)
    assert summary["success"] and summary["train"]["duplicates"] == 1
    path = shard(raw_dir, "train")
    rewrite(path, images={16: image_bytes(path, 6)})  # a second duplicate: one more than known
    with pytest.raises(
        DataValidationError, match=r"duplicate images: observed 2 images: .*expected at most 1"
    ):
        validate(tolerant, raw_dir=raw_dir, docs_dir=docs, metrics_file=metrics)
    assert not docs.exists() and not metrics.exists()


def test_main_exits_nonzero_and_logs_the_failed_run(project: Path, good_shards: Path) -> None:
    """main() on data that is not the full dataset: one line per failure, no outputs, MLflow run FAILED."""
    from mlflow.tracking import MlflowClient

    raw = project / "data" / "raw"
    raw.mkdir(parents=True)
    for path in good_shards.iterdir():
        (raw / path.name).write_bytes(path.read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        main()
    message = str(exit_info.value.code)
    assert "validate: train: row count: observed 20 images, expected 50000 images" in message
    assert message.splitlines()[-1].startswith("validate: FAILED")
    assert (
        not (project / "reports" / "data_docs").exists()
        and not (project / "metrics" / "validation.json").exists()
    )
    client = MlflowClient()
    experiment = client.get_experiment_by_name(load_params().mlflow.experiment)
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'validate'")
    assert run.info.status == "FAILED"
    assert run.data.metrics["success"] == 0 and run.data.metrics["train.failed"] >= 1


def test_main_logs_metrics_and_data_docs(project: Path) -> None:
    from mlflow.tracking import MlflowClient

    raw = project / "data" / "raw"
    raw.mkdir(parents=True)
    sizes = {"train": 200, "test": 100}  # the least a valid params file allows (preprocess keeps 10 a class)
    for seed, (split, size) in enumerate(sizes.items()):
        write_parquet_split(
            shard(raw, split), card_like_images(size, split, seed), np.arange(size) % NUM_CLASSES
        )
    # the expected split sizes are params: the fixture's
    write_params(
        project,
        validate={"train_images": sizes["train"], "test_images": sizes["test"]},
        preprocess={"val_size": 0},
    )
    main()
    summary = json.loads((project / "metrics" / "validation.json").read_text())
    assert summary["success"] and (project / "reports" / "data_docs" / "index.html").is_file()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(load_params().mlflow.experiment)
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'validate'")
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["success"] == 1 and metrics["failed"] == 0 and metrics["evaluated"] == summary["evaluated"]
    assert metrics["test.evaluated"] == summary["test"]["evaluated"] and metrics["test.train_overlap"] == 0
    assert "train.channel_mean.red" in metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data_docs")}
    assert "data_docs/index.html" in artifacts


def test_an_expectation_that_errors_becomes_a_failure_line() -> None:
    """A metric GE cannot compute is caught, reported as one ExceptionInfo per failed metric, and read."""
    frame = pd.DataFrame({"count": ["a", "b"]}, index=pd.Index(["x", "y"], name=INDEX))
    between = expect(
        "ExpectColumnValuesToBeBetween", "text", "numbers", column="count", min_value=0, max_value=1
    )
    in_set = expect("ExpectColumnValuesToBeInSet", "no column", "a column", column="nope", value_set=[1])
    report = run_checks([TableCheck("train", "table", frame, [between, in_set])], "validate")
    assert report.counts == {"train": {"evaluated": 2, "failed": 2}}
    assert [line.split(" (")[0] for line in report.failures] == [
        "validate: train: text: observed an error while checking",
        "validate: train: no column: observed an error while checking",
    ]
    assert 'column "nope"' in report.failures[1]


# --- processed arrays ------------------------------------------------------------------------------------


def processed_splits() -> tuple[dict[str, ArraySplit], dict[str, int]]:
    """100 raw train rows split 80/20 into train/val (both balanced), 50 test rows."""
    train_images = card_like_images(100, "train", 11)
    test_images = card_like_images(50, "test", 12)
    rows = np.arange(100)
    in_val = (rows // NUM_CLASSES) % 5 == 0  # rows 0-9 and 50-59: two of each class
    val_rows, fit_rows = rows[in_val], rows[~in_val]
    labels = rows % NUM_CLASSES
    splits = {
        "train": ArraySplit(train_images[fit_rows], labels[fit_rows], fit_rows),
        "val": ArraySplit(train_images[val_rows], labels[val_rows], val_rows),
        "test": ArraySplit(test_images, np.arange(50) % NUM_CLASSES, np.arange(50)),
    }
    return splits, {"train": 100, "test": 50}


def _keys(value: object) -> object:
    return {k: _keys(v) for k, v in value.items()} if isinstance(value, dict) else type(value).__name__


def test_processed_splits_pass() -> None:
    splits, raw_sizes = processed_splits()
    summary = check_processed_splits(splits, raw_sizes, tolerance=0.02)
    assert summary["success"] and summary["failed"] == 0 and summary["evaluated"] == 11
    assert summary["processed"] == {"success": True, "evaluated": 11, "failed": 0}
    assert summary["images"] == {"train": 80, "val": 20, "test": 50}
    assert summary["test_images_in_train_val"] == 0
    # preprocess writes this summary to metrics/processed_validation.json, which CI reads: same schema.
    committed = json.loads((PROJECT_ROOT / "metrics" / "processed_validation.json").read_text())
    assert _keys(summary) == _keys(committed)


def _replace(splits: dict[str, ArraySplit], name: str, **fields: np.ndarray) -> None:
    split = splits[name]
    splits[name] = ArraySplit(
        fields.get("images", split.images),
        fields.get("labels", split.labels),
        fields.get("source_rows", split.source_rows),
    )


def val_reuses_train_row(splits: dict[str, ArraySplit]) -> None:
    rows = splits["val"].source_rows.copy()
    rows[0] = splits["train"].source_rows[0]
    _replace(splits, "val", source_rows=rows)


def copy_test_image_into_train(splits: dict[str, ArraySplit]) -> None:
    images = splits["train"].images.copy()
    images[3] = splits["test"].images[7]
    _replace(splits, "train", images=images)


def float_images(splits: dict[str, ArraySplit]) -> None:
    _replace(splits, "val", images=splits["val"].images.astype(np.float32))


def grey_images(splits: dict[str, ArraySplit]) -> None:
    _replace(splits, "test", images=splits["test"].images[..., 0])


def lost_rows(splits: dict[str, ArraySplit]) -> None:
    _replace(
        splits, "train", **{k: getattr(splits["train"], k)[:-1] for k in ("images", "labels", "source_rows")}
    )


def unbalanced(splits: dict[str, ArraySplit]) -> None:
    labels = splits["train"].labels.copy()
    labels[labels == 9] = 0
    _replace(splits, "train", labels=labels)


def short_labels(splits: dict[str, ArraySplit]) -> None:
    _replace(splits, "val", labels=splits["val"].labels[:-1])


def label_out_of_range(splits: dict[str, ArraySplit]) -> None:
    labels = splits["test"].labels.copy()
    labels[[4, 17]] = [10, -1]
    _replace(splits, "test", labels=labels)


def negative_source_row(splits: dict[str, ArraySplit]) -> None:
    rows = splits["val"].source_rows.copy()
    rows[1] = -3
    _replace(splits, "val", source_rows=rows)


def int32_labels(splits: dict[str, ArraySplit]) -> None:
    _replace(splits, "train", labels=splits["train"].labels.astype(np.int32))


def float_source_rows(splits: dict[str, ArraySplit]) -> None:
    _replace(splits, "test", source_rows=splits["test"].source_rows.astype(np.float64))


FIX = "; fix split_arrays in stages/preprocess.py, then dvc repro preprocess"
PROCESSED_CORRUPTIONS: list[tuple[Callable[[dict[str, ArraySplit]], None], str]] = [
    (
        val_reuses_train_row,
        r"preprocess: processed: distinct source rows: observed 1 of 150 images: "
        r"val row 0: raw train row 10, as train row 0, expected every raw row used once",
    ),
    (
        copy_test_image_into_train,
        r"preprocess: processed: test images in train/val: observed 1 of 100 train/val images: train row 3 "
        r"\(same pixels as test row 7\), expected at most 0 \(.*"
        r"params\.yaml validate\.known_train_test_overlap\)$",
    ),
    (
        float_images,
        r"preprocess: processed: images dtype: observed 1 of 3 splits: val images: float32, "
        r"expected images of dtype uint8" + re.escape(FIX) + "$",
    ),
    (
        grey_images,
        r"preprocess: processed: image shape: observed 1 of 3 splits: test images: shape \(50, 32, 32\), "
        r"expected \(N, 32, 32, 3\) image arrays" + re.escape(FIX) + "$",
    ),
    (
        lost_rows,
        r"preprocess: processed: row counts: observed 1 of 2 raw splits: train: 99 rows in train \+ val, "
        r"100 kept, expected",
    ),
    (
        unbalanced,
        r"preprocess: processed: class share: observed 2 of 30 split classes: train airplane \(0\): 0\.2000, "
        r"train truck \(9\): 0\.0000, expected 0\.10 ± 0\.02 per class "
        r"\(params\.yaml validate\.class_share_tolerance\)$",
    ),
    (
        short_labels,
        r"preprocess: processed: array lengths: observed 1 of 3 splits: val \(images 20, labels 19, ",
    ),
    (
        label_out_of_range,
        r"preprocess: processed: label range: observed 2 of 150 images: test row 4: 10, test row 17: -1, "
        r"expected labels in 0\.\.9" + re.escape(FIX) + "$",
    ),
    (
        negative_source_row,
        r"preprocess: processed: source row: observed 1 of 150 images: val row 1: -3, "
        r"expected non-negative rows of the raw split" + re.escape(FIX) + "$",
    ),
    (
        int32_labels,
        r"preprocess: processed: labels dtype: observed 1 of 3 splits: train labels: int32, "
        r"expected labels of dtype int64" + re.escape(FIX) + "$",
    ),
    (
        float_source_rows,
        r"preprocess: processed: source_rows dtype: observed 1 of 3 splits: test source_rows: float64, "
        r"expected source_rows of dtype int32 or int64 or uint32 or uint64" + re.escape(FIX) + "$",
    ),
]


@pytest.mark.parametrize(
    ("corrupt", "message"), PROCESSED_CORRUPTIONS, ids=[c.__name__ for c, _ in PROCESSED_CORRUPTIONS]
)
def test_processed_corruption_fails(corrupt: Callable[[dict[str, ArraySplit]], None], message: str) -> None:
    splits, raw_sizes = processed_splits()
    corrupt(splits)
    with pytest.raises(DataValidationError) as failure:
        check_processed_splits(splits, raw_sizes, tolerance=0.02)
    lines = failure.value.failures
    assert str(failure.value).splitlines() == lines
    assert all(PROCESSED_LINE.match(line) for line in lines), lines
    # Every line says how to fix it: the split code, or the params.yaml key that sets the bound.
    assert all(line.endswith(FIX) or "params.yaml validate." in line for line in lines), lines
    assert any(re.match(message, line) for line in lines), "\n".join(lines)
    summary = failure.value.summary
    assert summary is not None and summary["evaluated"] == 11 and summary["failed"] == len(lines)
    assert not summary["success"] and summary["processed"]["failed"] == len(lines)


def test_processed_empty_val_and_known_overlap() -> None:
    splits, raw_sizes = processed_splits()
    train, val = splits["train"], splits["val"]
    splits["train"] = ArraySplit(
        np.concatenate([train.images, val.images]),
        np.concatenate([train.labels, val.labels]),
        np.concatenate([train.source_rows, val.source_rows]),
    )
    splits["val"] = val.head(0)  # val_size 0: an empty validation split has no class shares to check
    copy_test_image_into_train(splits)
    with pytest.raises(
        DataValidationError, match="test images in train/val: observed 1 of 100 train/val images:"
    ):
        check_processed_splits(splits, raw_sizes, tolerance=0.02)
    summary = check_processed_splits(splits, raw_sizes, tolerance=0.02, known_train_test_overlap=1)
    assert summary["success"] and summary["images"]["val"] == 0


# --- the real mirror -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_real_mirror_passes(real_mirror: Path, tmp_path: Path) -> None:
    """The whole mirror (50,000 + 10,000 images) against the committed params; takes ~30 s on 2 busy cores."""
    params = load_params(PROJECT_ROOT / "params.yaml").validation
    docs, metrics = outputs(tmp_path)
    summary = validate(params, raw_dir=real_mirror, docs_dir=docs, metrics_file=metrics)
    assert summary["success"], summary
    assert {split: summary[split]["images"] for split in ("train", "test")} == params.split_sizes()
    assert summary["train"]["duplicates"] <= params.known_duplicates_train
    assert summary["test"]["duplicates"] <= params.known_duplicates_test
    assert summary["test"]["train_overlap"] <= params.known_train_test_overlap
    card = DATA_CARD_CHANNEL_STATS["train"]
    assert summary["train"]["channel_mean"]["red"] == pytest.approx(card["mean"][0], abs=1e-3)
    assert (docs / "index.html").is_file() and json.loads(metrics.read_text()) == summary


def test_a_bad_shard_points_at_the_source_too_not_only_at_a_re_fetch(raw_dir: Path, tmp_path: Path) -> None:
    """Re-fetching from a corrupt mirror brings the same bytes: the hint names the checks that find it."""
    truncated_file(raw_dir)
    with pytest.raises(DataValidationError) as failure:
        run_validate(raw_dir, tmp_path)
    line = next(line for line in failure.value.failures if "Parquet shard readable" in line)
    assert "dvc repro download" in line
    assert "sha256sum -c SHA256SUMS" in line and "metrics/data_source.json" in line
