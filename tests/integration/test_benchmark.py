"""The training benchmark: real (tiny) training runs per seed, knob choice on validation only, a reference
recipe run as a subprocess on our data, provenance on every entry, and the rendered report."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from benchmarks import training as benchmark
from cifar10_pipeline.core.data import ArraySplit, save_split
from cifar10_pipeline.core.params import ParamsError
from cifar10_pipeline.reporting.benchmark_records import Candidate

from ..conftest import PROJECT_ROOT, synthetic_images

TINY = [
    "train.device=cpu",
    "train.widths=[8,16,16]",
    "train.batch_size=50",
    "train.epochs=1",
    "train.vit_dim=16",
    "train.vit_depth=1",
    "train.vit_heads=2",
]
ORIGIN = {
    "machine": "test machine",
    "device": "cpu",
    "torch": "2.13.0+cpu",
    "git_commit": "0" * 40,
    "date": "2026-12-01T00:00:00+00:00",
    "command": "pytest",
}


def write_processed(folder: Path, val: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", 400, 1), ("val", val, 2), ("test", 100, 3)):
        images, labels = synthetic_images(max(n, 1), seed)
        images, labels = images[:n], labels[:n]
        save_split(folder / f"{name}.npz", ArraySplit(images, labels, np.arange(n)))
    return folder


@pytest.fixture
def processed(tmp_path: Path) -> Path:
    return write_processed(tmp_path, val=20)


def tiny_params(model: str = "cifar_convnet"):
    return benchmark.load_profile("quick", [f"train.model={model}", *TINY], PROJECT_ROOT / "conf")


@pytest.mark.parametrize("model", ["cifar_convnet", "cifar_vit"])
def test_each_seed_is_a_real_run_and_saved_as_it_ends(processed: Path, model: str) -> None:
    partials: list[benchmark.TrainingEntry] = []
    entry = benchmark.benchmark_training(
        tiny_params(model), [0, 1], processed, partials.append, origin=ORIGIN
    )
    assert [p.seeds for p in partials] == [[0], [0, 1]]
    assert entry.model == model and entry.scored_split == "test" and entry.scored_images == 100
    assert len(set(entry.accuracies)) == 2 or entry.accuracies[0] in (0.0, 1.0)  # two real, seeded runs
    # The epochs' loop is part of the timed run, not all of it (evaluation and setup are timed too).
    assert all(0 < loop < total for loop, total in zip(entry.loop_seconds, entry.train_seconds, strict=True))
    # The reference recipes' clock starts with the data on the device: inside ours, around the loop.
    spans = zip(entry.loop_seconds, entry.data_on_device_seconds, entry.train_seconds, strict=True)
    assert all(loop < on_device <= total for loop, on_device, total in spans)
    assert entry.tta_fraction == 0.25
    assert entry.process_to_first_seed_seconds > entry.train_seconds[0]
    if model == "cifar_vit":
        assert entry.forward_macs_per_image["transformer"] > 0


def test_command_line_overrides_win_over_the_profile() -> None:
    params = benchmark.load_profile("gpu_fast", ["train.epochs=12"], PROJECT_ROOT / "conf")
    assert params.train.epochs == 12 and params.train.filter_optimizer == "muon"
    with pytest.raises(ParamsError, match=r"Could not override .train\.epoch."):
        benchmark.load_profile("gpu_fast", ["train.epoch=12"], PROJECT_ROOT / "conf")


def test_selection_scores_validation_images_and_never_the_test_set(tmp_path: Path) -> None:
    processed = write_processed(tmp_path / "processed", val=30)
    entry = benchmark.select_knobs(
        "quick", {"train.label_smoothing": [0.0, 0.2]}, 2, processed, TINY, PROJECT_ROOT / "conf",
        ORIGIN,
    )  # fmt: skip
    assert entry.val_images == 30 and entry.train_images == 400
    assert [c.overrides for c in entry.candidates] == [
        {"train.label_smoothing": 0.0},
        {"train.label_smoothing": 0.2},
    ]
    assert entry.seeds == [100, 101]
    best = max(entry.candidates, key=lambda c: c.val_accuracy_mean)
    assert entry.chosen == best.overrides


def _candidate(epochs: float, accuracies: list[float], seconds: float) -> Candidate:
    return Candidate(
        overrides={"train.epochs": epochs}, val_accuracies=accuracies,
        val_accuracy_mean=float(np.mean(accuracies)), val_accuracy_std=float(np.std(accuracies, ddof=1)),
        train_seconds_median=seconds,
    )  # fmt: skip


def test_the_one_se_rule_takes_the_fastest_candidate_within_the_best_ones_noise() -> None:
    # best: 0.906 ± 0.0016 over 4 seeds, standard error 0.0008: a mean of 0.9055 is in, 0.9045 is out.
    best = _candidate(8.25, [0.904, 0.906, 0.906, 0.908], 1.3)
    within = _candidate(7.5, [0.905, 0.9055, 0.9055, 0.906], 1.2)
    cheapest_outside = _candidate(6.5, [0.9045] * 4, 1.0)
    candidates = [cheapest_outside, best, within]
    assert benchmark.choose_candidate(candidates, "best") is best
    assert benchmark.choose_candidate(candidates, "one-se") is within
    assert benchmark.choose_candidate([best], "one-se") is best


def test_selection_refuses_a_split_without_validation_images(tmp_path: Path) -> None:
    processed = write_processed(tmp_path / "processed", val=0)
    with pytest.raises(SystemExit, match="never on the test set"):
        benchmark.select_knobs("quick", {"train.epochs": [1]}, 1, processed, TINY, PROJECT_ROOT / "conf")


FAKE_RECIPE = """
import torch
data = torch.load("cifar10/train.pt")
test = torch.load("cifar10/test.pt")
assert data["images"].dtype == torch.uint8 and data["images"].shape[1:] == (32, 32, 3), data["images"].shape
print("train images", len(data["labels"]), "test images", len(test["labels"]), flush=True)
def rule(): print("-" * 60)
rule(); print("|  run     |  epoch  |  tta_val_acc  |  time_seconds  |"); rule()
for run in ["warmup"] + list(range(1, 200)):
    print(f"|  {run!s:>6}  |      0  |               |                |")
    print(f"|          |      1  |  {0.9 + 0.001 * (run if run != 'warmup' else 50):.4f}  |  {1.5:.4f}  |")
    rule()
    print(f"Mean accuracy after {run} runs", end="\\r", flush=True)
"""


def test_reference_recipe_runs_unmodified_on_our_data_and_stops_after_n_runs(tmp_path: Path) -> None:
    processed = write_processed(tmp_path / "processed", val=0)
    recipe = tmp_path / "recipe" / "fake_recipe.py"
    recipe.parent.mkdir()
    recipe.write_text(textwrap.dedent(FAKE_RECIPE))
    entry = benchmark.run_reference(recipe, 3, "local test recipe", processed, timeout=120, origin=ORIGIN)
    assert entry.runs == 3 and entry.accuracies == [0.901, 0.902, 0.903]  # the warm-up run is left out
    assert entry.seconds == [1.5] * 3 and entry.train_images == 400 and entry.test_images == 100
    assert entry.recipe == "fake_recipe.py" and len(entry.recipe_sha256) == 64


def test_reference_recipe_with_another_compile_mode_runs_a_recorded_copy(tmp_path: Path) -> None:
    processed = write_processed(tmp_path / "processed", val=0)
    recipe = tmp_path / "recipe" / "compiled_recipe.py"
    recipe.parent.mkdir()
    recipe.write_text("assert dict(mode='max-autotune')\n" + textwrap.dedent(FAKE_RECIPE))
    original = recipe.read_text()
    entry = benchmark.run_reference(
        recipe, 1, "local", processed, timeout=120, origin=ORIGIN, compile_mode="default"
    )
    assert entry.modification == (
        "torch.compile mode 'max-autotune' set to 'default' (1 place), nothing else changed"
    )
    assert recipe.read_text() == original and entry.recipe_sha256 == benchmark.file_digest(recipe)
    plain = benchmark.run_reference(recipe, 1, "local", processed, timeout=120, origin=ORIGIN)
    assert plain.modification is None
    recipe.write_text("print('no compile here')\n")
    with pytest.raises(SystemExit, match="no mode='max-autotune' compile to change"):
        benchmark.run_reference(
            recipe, 1, "local", processed, timeout=120, origin=ORIGIN, compile_mode="default"
        )


def test_a_recipe_without_a_warm_up_run_has_its_first_run_dropped(tmp_path: Path) -> None:
    processed = write_processed(tmp_path / "processed", val=0)
    recipe = tmp_path / "no_warmup.py"
    recipe.write_text(textwrap.dedent(FAKE_RECIPE).replace('["warmup"] + list(range(1, 200))', "range(200)"))
    entry = benchmark.run_reference(recipe, 2, "local", processed, timeout=120, origin=ORIGIN)
    assert entry.accuracies == [0.901, 0.902] and entry.runs == 2  # run 0 (it compiles) is left out
    assert benchmark.FIRST_TIMED_RUN_EXCLUDED in entry.timing
    # An entry measured before the runner did this is mended by merge --drop-first-run.
    timing = entry.timing.replace(benchmark.FIRST_TIMED_RUN_EXCLUDED, benchmark.FIRST_RUN_EXCLUDED)
    old = entry.model_copy(update={"timing": timing})
    mended = benchmark.without_first_run(old)
    assert mended.accuracies == [0.902] and mended.runs == 1 and mended.seconds_median == 1.5
    with pytest.raises(SystemExit, match="cannot drop"):
        benchmark.without_first_run(mended)


def test_reference_recipe_that_fails_reports_its_output(tmp_path: Path) -> None:
    processed = write_processed(tmp_path / "processed", val=0)
    recipe = tmp_path / "broken.py"
    recipe.write_text("raise SystemExit('no GPU here')\n")
    with pytest.raises(SystemExit, match=r"(?s)finished 0 of 2 runs.*no GPU here"):
        benchmark.run_reference(
            recipe, 2, "test", processed, timeout=60, origin=ORIGIN, python=sys.executable
        )


def test_recipe_table_parser_takes_the_last_row_of_each_run() -> None:
    lines = [
        "-----------------------------------\n",
        "|  run  |  epoch  |  tta_val_acc  |  total_time_seconds  |\n",
        "-----------------------------------\n",
        "|    1  |      0  |               |       0.1000  |\n",
        "|       |      9  |       0.9300  |      23.0000  |\n",
        "-----------------------------------\n",
        "Mean so far\r|    2  |      0  |               |       0.1000  |\n",
        "|       |      9  |       0.9310  |      23.5000  |\n",
        "-----------------------------------\n",
    ]
    rows = list(benchmark.parse_recipe_rows(iter(lines)))
    assert [(r["run"], r["tta_val_acc"], r["total_time_seconds"]) for r in rows] == [
        ("1", "0.9300", "23.0000"),
        ("2", "0.9310", "23.5000"),
    ]


def test_save_merges_entries_validates_them_and_renders_the_report(tmp_path: Path, processed: Path) -> None:
    metrics, report = tmp_path / "benchmark.json", tmp_path / "benchmark.md"
    entry = benchmark.benchmark_training(tiny_params(), [0], processed, origin=ORIGIN)
    benchmark.save({"first": entry}, metrics, report)
    benchmark.save({"second": entry.model_copy(update={"profile": "other"})}, metrics, report)
    assert set(json.loads(metrics.read_text())) == {"first", "second"}
    text = report.read_text()
    assert "| first | quick" in text and "| second | other" in text and "test machine" in text
    # A key that no code writes (a hand-typed note) makes the file invalid.
    raw = json.loads(metrics.read_text())
    raw["first"]["note"] = "typed by hand"
    metrics.write_text(json.dumps(raw))
    with pytest.raises(ValidationError, match="note"):
        benchmark.read_results(metrics)


def test_merge_brings_in_entries_from_another_machine(tmp_path: Path, processed: Path) -> None:
    entry = benchmark.benchmark_training(tiny_params(), [0], processed, origin=ORIGIN)
    gpu_file, metrics = tmp_path / "from_gpu.json", tmp_path / "benchmark.json"
    benchmark.save({"gpu_run": entry.model_copy(update={"machine": "one NVIDIA H200"})}, gpu_file)
    benchmark.save({"cpu_run": entry}, metrics)
    # As the docs run it: a script beside benchmarks/serving.py, not a module of the package.
    subprocess.run(
        [sys.executable, "benchmarks/training.py", "merge", str(gpu_file), "--metrics-file", str(metrics),
         "--report", str(tmp_path / "r.md")],
        cwd=PROJECT_ROOT, check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "gpu_run" in (tmp_path / "r.md").read_text()
    merged = benchmark.read_results(metrics)
    assert merged["gpu_run"].machine == "one NVIDIA H200" and merged["cpu_run"].machine == "test machine"


def test_refuses_zero_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        benchmark.main(["run", "--seeds", "0"])
    assert "--seeds and --runs must be at least 1" in capsys.readouterr().err


def test_an_entry_takes_its_commit_from_the_tree_and_none_can_be_typed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    from cifar10_pipeline.core.provenance import tree_provenance

    origin = benchmark.provenance(torch.device("cpu"), "pytest")
    tree = tree_provenance(PROJECT_ROOT)
    assert (origin["git_commit"], origin["git_dirty"]) == (tree.commit, tree.dirty)
    with pytest.raises(SystemExit):
        benchmark.main(["run", "--seeds", "1", "--git-commit", "06d24a3a"])
    assert "unrecognized arguments: --git-commit 06d24a3a" in capsys.readouterr().err
