"""What ``records/benchmark.json`` holds: one validated record per entry, keyed by name.

The training benchmark (``python benchmarks/training.py``, outside the package) writes these records;
``reporting.docs`` reads them to render README.md, docs/gpu.md and reports/benchmark.md, and the model card
stage quotes the knob-selection records. ``extra="forbid"``: a key that the benchmark does not write cannot be
in the file (tests/unit/test_metrics_written_by_code.py validates the committed file against these models).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Provenance(_Record):
    machine: str  # the host: CPU model and cores, plus the GPU where one was used
    device: str  # what the work ran on
    torch: str
    # From core/provenance.py: the tree's commit, whether it had uncommitted changes, how the commit was read,
    # and why there is none where it could not be read. tests/unit/test_records_commits.py: in the history.
    git_commit: str | None
    git_dirty: bool | None = None
    commit_source: str | None = None
    commit_unknown_reason: str | None = None
    date: str  # UTC, ISO 8601
    command: str  # how to make this entry again


class Emissions(_Record):
    emissions_kg: float
    energy_kwh: float
    duration_s: float
    country_iso_code: str


class TrainingEntry(Provenance):
    kind: Literal["training"] = "training"
    profile: str
    overrides: list[str]
    model: str
    epochs: float
    batch_size: int
    widths: list[int]
    compile: str | bool
    cuda_graphs: bool
    augmentation: dict[str, int | bool]
    tta_level: int
    tta_fraction: float = 1.0  # selective TTA: the fraction of training images below its threshold
    train_images: int
    scored_split: Literal["test", "val"]
    scored_images: int
    seeds: list[int]
    accuracies: list[float]
    accuracy_mean: float
    accuracy_std: float
    train_seconds: list[float]
    train_seconds_median: float
    loop_seconds: list[float]
    loop_seconds_median: float
    # The reference recipes' definition: from the data already on the device to the end of the final
    # evaluation (train_seconds also counts copying the training and test images to the device).
    data_on_device_seconds: list[float] | None = None
    data_on_device_seconds_median: float | None = None
    warmup_seconds: float
    process_to_first_seed_seconds: float
    data: str
    emissions: Emissions | None = None
    parameters: int | None = None
    forward_macs_per_image: dict[str, float] | None = None


class Candidate(_Record):
    overrides: dict[str, Any]
    val_accuracies: list[float]
    val_accuracy_mean: float
    val_accuracy_std: float
    train_seconds_median: float


class SelectionEntry(Provenance):
    kind: Literal["selection"] = "selection"
    profile: str
    protocol: str
    grid: dict[str, list[Any]]
    fixed_overrides: list[str]
    seeds: list[int]
    train_images: int
    val_images: int
    candidates: list[Candidate]
    chosen: dict[str, Any]
    data: str


class ReferenceEntry(Provenance):
    kind: Literal["reference"] = "reference"
    recipe: str
    recipe_sha256: str
    source: str
    runs: int
    accuracies: list[float]
    accuracy_mean: float
    accuracy_std: float
    seconds: list[float]
    seconds_median: float
    timing: str
    train_images: int
    test_images: int
    data: str
    modification: str | None = None  # what was changed in a copy of the recipe (None: run as published)


class ThroughputVariant(_Record):
    """One way of training the parent model, timed in the same run as the others."""

    name: str
    settings: dict[str, Any]  # the train params that differ between variants (compile, cuda_graphs, ...)
    batch_size: int
    train_images_per_second: float  # after the first epoch (compile and capture excluded)
    first_epoch_seconds: float | None  # the first epoch, compile and CUDA-graph capture included
    train_peak_memory_gib: float | None
    speedup_over_plain: float  # train images/s over the plain bf16 eager variant's


class ParentVitEntry(Provenance):
    kind: Literal["parent_vit_throughput"] = "parent_vit_throughput"
    model: str
    parameters: int
    profile: str  # the profile whose step is one of the variants
    variants: list[ThroughputVariant]
    inference_images_per_second: float  # plain bf16 eager, the first variant's batch


Entry = Annotated[
    TrainingEntry | SelectionEntry | ReferenceEntry | ParentVitEntry, Field(discriminator="kind")
]
BENCHMARK_FILE = TypeAdapter(dict[str, Entry])


def read_results(path: Path) -> dict[str, Entry]:
    """The entries in ``path``, validated (an empty dict when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return {}
    return BENCHMARK_FILE.validate_python(json.loads(path.read_text()))
