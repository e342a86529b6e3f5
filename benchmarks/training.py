"""Training benchmark: the train stage's own code over several seeds, reference recipes side by side, and
knob choice on a validation hold-out. Not a DVC stage: run it on the machine the figures should describe.

    python benchmarks/training.py run --profile default --seeds 3
    python benchmarks/training.py run --profile gpu_fast --seeds 10
    python benchmarks/training.py select --profile gpu_fast --processed-dir data/processed_val5000 \\
        --grid train.head_lr_scale=0.5,1.0 --grid train.label_smoothing=0.15,0.2 --seeds 6
    python benchmarks/training.py reference ../airbench/airbench94_muon.py --runs 10 \\
        --source https://github.com/KellerJordan/cifar10-airbench@<commit>
    python benchmarks/training.py parent-vit --batch-size 512   # the parent model's step, plain and ours
    python benchmarks/training.py parent-checkpoint DIR         # its architecture, random weights (offline)
    python benchmarks/training.py merge results-from-the-gpu-machine.json

Every entry is written by this script and carries its provenance: machine, device, torch version, git commit
and date (``Provenance``). The entries' models live in the package (``cifar10_pipeline.reporting.
benchmark_records``), which renders them into the docs and never imports this script. Entries merge into
``records/benchmark.json`` by name, so figures from several machines (a CPU VM, an H200) live side by side,
each naming its own; ``reports/benchmark.md`` is re-rendered from the merged file every time.
``--metrics-file`` writes elsewhere (e.g. ``$OUT`` on a GPU machine), and ``merge`` brings such a file in.

Timing: ``train_seconds`` is device-synchronised from the uint8 training and test images on the host (copied
to the device, then whitening, graph capture, every epoch, selective TTA's threshold) to the end of the final
evaluation with test-time augmentation; ``data_on_device_seconds`` is the same span from the moment both
splits are on the device, the reference recipes' definition; ``loop_seconds`` is the epochs' loop alone. A
reference recipe is timed by its own clock (CUDA events around its training and final evaluation, data
already on the GPU) and reported as it prints it.

Choosing knobs (``select``): candidates are trained on the training part of a stratified hold-out split and
scored on its validation images only, never on the test set; the candidate with the highest mean validation
accuracy over the given seeds wins. The chosen values are then set in the profile, which trains on all
training images, and ``run`` scores the test set once per reported seed (docs/gpu.md, "How knobs are chosen").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import psutil
import torch
import yaml

from cifar10_pipeline import CLASS_NAMES
from cifar10_pipeline.core.data import ArraySplit, load_processed
from cifar10_pipeline.core.device import cpu_model_name, describe_device, resolve_device, synchronize
from cifar10_pipeline.core.hashing import file_digest
from cifar10_pipeline.core.io import atomic_output
from cifar10_pipeline.core.params import Params, compose, validate_params
from cifar10_pipeline.core.paths import BENCHMARK_RECORD, CONF_DIR, DATA_SOURCE, PROCESSED_DIR
from cifar10_pipeline.core.provenance import tree_provenance
from cifar10_pipeline.modeling.architectures import architecture, build_model
from cifar10_pipeline.reporting.benchmark_records import (
    Candidate,
    Emissions,
    Entry,
    ParentVitEntry,
    ReferenceEntry,
    SelectionEntry,
    ThroughputVariant,
    TrainingEntry,
    read_results,
)
from cifar10_pipeline.reporting.docs import BENCHMARK_REPORT, render_benchmark_report
from cifar10_pipeline.training.loop import evaluate_normalised, train_classifier

SELECTION_SEED_START = 100  # selection runs use seeds 100, 101, ...; reported test runs use 0, 1, ...


# ---------------------------------------------------------------------------------------------------------
# Provenance


def machine_name(device: torch.device) -> str:
    host = f"{cpu_model_name()}, {psutil.cpu_count(logical=True)} logical cores"
    if device.type == "cuda":
        return f"one {torch.cuda.get_device_name(device)} (host {host})"
    return host


def provenance(device: torch.device, command: str) -> dict[str, Any]:
    """Where an entry comes from; the commit read from the tree (core/provenance.py), never typed."""
    return {
        "machine": machine_name(device),
        "device": describe_device(device),
        "torch": torch.__version__,
        **tree_provenance(Path(__file__).resolve().parent).fields(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
    }


def data_source() -> str:
    if not DATA_SOURCE.is_file():
        return "unknown (metrics/data_source.json missing)"
    source = json.loads(DATA_SOURCE.read_text())
    suffix = " (JPEG-derived mirror)" if source["source"] == "mirror" else ""
    return f"{source['source']}{suffix}"


# ---------------------------------------------------------------------------------------------------------
# Our training runs


def load_profile(profile: str, overrides: list[str], conf_dir: Path = CONF_DIR) -> Params:
    """conf/ composed with ``profile`` and ``-S section.key=value`` overrides, through the same Hydra
    composition as ``dvc exp run -S profile=... -S ...``: an explicit override always wins."""
    return validate_params(
        compose([f"profile={profile}", *overrides], conf_dir), source=f"{conf_dir}/ (profile {profile})"
    )


def run_seed(params: Params, train: ArraySplit, scored: ArraySplit, seed: int, device: torch.device) -> dict:
    """Train one seed on ``train`` and score ``scored`` with the model's (selective) test-time augmentation.

    Two clocks: ``seconds`` from the uint8 images on the host, ``data_on_device_seconds`` from the moment
    both splits are on the device (the reference recipes' clock). Both end after the final evaluation.
    """
    from cifar10_pipeline.modeling.inference import (
        TTA_FIT_TRAIN_IMAGES,
        fit_selective_tta,
        normalize,
        tta_confidence,
    )

    hp = params.train.model_copy(update={"seed": seed})
    model = build_model(hp)
    synchronize(device)
    start = time.perf_counter()
    on_device = ArraySplit(
        torch.as_tensor(train.images).to(device), torch.as_tensor(train.labels).to(device), train.source_rows
    )
    scored_images = torch.as_tensor(scored.images).to(device)
    y = torch.as_tensor(scored.labels).to(device)
    synchronize(device)
    data_on_device = time.perf_counter()
    result = train_classifier(model, on_device, None, hp, device, progress=False)
    # As the train stage does without a validation split: the threshold from the first training images.
    if hp.tta_fraction < 1.0 and model.config.tta_level:
        fit_selective_tta(model, on_device.images[:TTA_FIT_TRAIN_IMAGES], None, hp.tta_fraction, hp.precision)
    # The final evaluation with test-time augmentation counts as training time, as in the published records.
    x = normalize(scored_images, model.config.image_mean, model.config.image_std)
    threshold = tta_confidence(model.config)
    _, accuracy = evaluate_normalised(
        model, x, y, hp.precision, tta_level=model.config.tta_level, below_confidence=threshold
    )
    synchronize(device)
    end = time.perf_counter()
    return {
        "seed": seed,
        "accuracy": accuracy,
        "seconds": end - start,
        "data_on_device_seconds": end - data_on_device,
        "loop_seconds": result.train_seconds,
    }


def warm_up(params: Params, train: ArraySplit, device: torch.device) -> float:
    """A short run that pays the one-off costs (cuDNN autotuning, torch.compile) before timing starts."""
    if device.type != "cuda" and not params.train.compile:
        return 0.0
    hp = params.train.model_copy(update={"epochs": min(params.train.epochs, 0.3)})
    start = time.perf_counter()
    train_classifier(build_model(hp), train, None, hp, device, progress=False)
    synchronize(device)
    return time.perf_counter() - start


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def training_entry(
    params: Params,
    overrides: list[str],
    runs: list[dict],
    train: ArraySplit,
    scored: ArraySplit,
    scored_split: Literal["test", "val"],
    warmup_seconds: float,
    first_seed_at: float,
    origin: dict[str, str],
) -> TrainingEntry:
    hp = params.train
    accuracies = [r["accuracy"] for r in runs]
    seconds = [round(r["seconds"], 3) for r in runs]
    loops = [round(r["loop_seconds"], 3) for r in runs]
    on_device = [round(r["data_on_device_seconds"], 3) for r in runs]
    mean, std = _spread(accuracies)
    return TrainingEntry(
        **origin,
        profile=params.profile,
        overrides=overrides,
        model=hp.model,
        epochs=hp.epochs,
        batch_size=hp.batch_size,
        widths=hp.widths,
        compile=hp.compile,
        cuda_graphs=hp.cuda_graphs,
        augmentation={"flip": hp.flip, "translate": hp.translate, "cutout": hp.cutout},
        tta_level=hp.tta_level,
        tta_fraction=hp.tta_fraction,
        train_images=len(train),
        scored_split=scored_split,
        scored_images=len(scored),
        seeds=[r["seed"] for r in runs],
        accuracies=accuracies,
        accuracy_mean=mean,
        accuracy_std=std,
        train_seconds=seconds,
        train_seconds_median=statistics.median(seconds),
        loop_seconds=loops,
        loop_seconds_median=statistics.median(loops),
        data_on_device_seconds=on_device,
        data_on_device_seconds_median=statistics.median(on_device),
        warmup_seconds=round(warmup_seconds, 2),
        process_to_first_seed_seconds=round(first_seed_at, 2),
        data=data_source(),
        **model_facts(params),
    )


def benchmark_training(
    params: Params,
    seeds: list[int],
    processed_dir: Path = PROCESSED_DIR,
    on_seed: Callable[[TrainingEntry], None] | None = None,
    overrides: list[str] | None = None,
    origin: dict[str, str] | None = None,
) -> TrainingEntry:
    """Train and test-score each seed; ``on_seed`` gets the entry so far after each (long runs lose
    nothing)."""
    device = resolve_device(params.train.device)
    splits = load_processed(processed_dir)
    origin = origin or provenance(device, "benchmark_training()")
    warmup_seconds = warm_up(params, splits["train"], device)
    runs: list[dict] = []
    first_seed_at = 0.0
    for seed in seeds:
        runs.append(run_seed(params, splits["train"], splits["test"], seed, device))
        first_seed_at = first_seed_at or time.time() - psutil.Process().create_time()
        print(
            f"seed {seed}: test accuracy {runs[-1]['accuracy']:.4f} in {runs[-1]['seconds']:.3f} s "
            f"({runs[-1]['data_on_device_seconds']:.3f} s from the data on the device, "
            f"{runs[-1]['loop_seconds']:.3f} s in the epochs' loop)",
            flush=True,
        )
        entry = training_entry(
            params, overrides or [], runs, splits["train"], splits["test"], "test", warmup_seconds,
            first_seed_at, origin,
        )  # fmt: skip
        if on_seed is not None:
            on_seed(entry)
    return entry


def model_facts(params: Params) -> dict[str, Any]:
    """The architecture's own size/compute figures (the from-scratch ViT's compute split; else nothing)."""
    facts = architecture(params.train.model).facts
    return {} if facts is None else facts(build_model(params.train))


# ---------------------------------------------------------------------------------------------------------
# Knob choice on validation data


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``section.key=v1,v2`` items -> {section.key: [v1, v2]} (values parsed as YAML)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or "." not in key or not values:
            raise SystemExit(f"--grid {item!r}: expected section.key=value1,value2")
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


# How `select` picks the winner from the candidates' validation scores (never from test scores).
SELECTION_RULES = {
    "best": "highest mean validation accuracy over seeds {seeds} wins",
    # Breiman's one-standard-error rule: a cheaper candidate is as good as the best one when it is within
    # the noise of the best one's estimate. For knobs that buy accuracy with time (epochs, batch size).
    "one-se": (
        "the fastest candidate (median seconds a seed) whose mean validation accuracy over seeds {seeds} is "
        "within one standard error (std / sqrt(seeds)) of the highest mean wins"
    ),
}


def choose_candidate(candidates: list[Candidate], rule: str) -> Candidate:
    best = max(candidates, key=lambda c: c.val_accuracy_mean)
    if rule == "best":
        return best
    floor = best.val_accuracy_mean - best.val_accuracy_std / math.sqrt(len(best.val_accuracies))
    return min((c for c in candidates if c.val_accuracy_mean >= floor), key=lambda c: c.train_seconds_median)


def select_knobs(
    profile: str,
    grid: dict[str, list[Any]],
    seeds: int,
    processed_dir: Path,
    fixed: list[str] | None = None,
    conf_dir: Path = CONF_DIR,
    origin: dict[str, str] | None = None,
    on_candidate: Callable[[SelectionEntry], None] | None = None,
    rule: str = "best",
) -> SelectionEntry:
    """Train every grid point on the hold-out split's training part, score its validation images only, and
    choose by ``rule`` (SELECTION_RULES)."""
    splits = load_processed(processed_dir)
    train, val = splits["train"], splits["val"]
    if not len(val):
        raise SystemExit(
            f"{processed_dir} has no validation images: knobs are chosen on a hold-out, never on the test "
            "set. Make one with the preprocess stage and preprocess.val_size > 0."
        )
    fixed = fixed or []
    keys = list(grid)
    seed_list = [SELECTION_SEED_START + i for i in range(seeds)]
    device: torch.device | None = None
    candidates: list[Candidate] = []
    for values in itertools.product(*grid.values()):
        chosen = dict(zip(keys, values, strict=True))
        sets = fixed + [f"{k}={json.dumps(v)}" for k, v in chosen.items()]
        params = load_profile(profile, sets, conf_dir)
        if device is None:
            device = resolve_device(params.train.device)
            origin = origin or provenance(device, "select_knobs()")
            warm_up(params, train, device)
        runs = [run_seed(params, train, val, seed, device) for seed in seed_list]
        accuracies = [r["accuracy"] for r in runs]
        mean, std = _spread(accuracies)
        candidates.append(
            Candidate(
                overrides=chosen,
                val_accuracies=accuracies,
                val_accuracy_mean=mean,
                val_accuracy_std=std,
                train_seconds_median=statistics.median(round(r["seconds"], 3) for r in runs),
            )
        )
        print(f"{chosen}: validation accuracy {100 * mean:.2f}% ± {100 * std:.2f}", flush=True)
        winner = choose_candidate(candidates, rule)
        entry = SelectionEntry(
            **origin,
            profile=profile,
            protocol=(
                f"trained on {len(train):,} images of a stratified hold-out split of the training images, "
                f"scored on its {len(val):,} validation images (never the test set); "
                + SELECTION_RULES[rule].format(seeds=f"{seed_list[0]}-{seed_list[-1]}")
            ),
            grid=grid,
            fixed_overrides=fixed,
            seeds=seed_list,
            train_images=len(train),
            val_images=len(val),
            candidates=candidates,
            chosen=winner.overrides,
            data=data_source(),
        )
        if on_candidate is not None:
            on_candidate(entry)
    return entry


# ---------------------------------------------------------------------------------------------------------
# Reference recipes (their code stays in their own repositories; we only run it)

_DASHES = re.compile(r"^-{10,}$")


def parse_recipe_rows(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """The final row of every run from the airbench-style tables the speed-run recipes print.

    The table prints one row per epoch with the run number on its first row only, and a dashed rule after
    each run's final row; yields {column: value} for each final row, with ``run`` filled in.
    """
    header: list[str] | None = None
    pending: list[str] | None = None
    run = ""
    for raw in lines:
        line = raw.rstrip("\n").split("\r")[-1].strip()  # progress lines end in \r, not \n
        if _DASHES.match(line):
            if header is not None and pending is not None:
                yield dict(zip(header, pending, strict=False)) | {"run": run}
            pending = None
            continue
        if not (line.startswith("|") and line.endswith("|")):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if header is None or cells[0] == "run":
            header, pending = cells, None
            continue
        run = cells[0] or run
        pending = cells


def write_recipe_data(processed_dir: Path, folder: Path) -> tuple[int, int]:
    """Our processed split in the recipes' data format: cifar10/{train,test}.pt of uint8 NHWC tensors."""
    splits = load_processed(processed_dir)
    if len(splits["val"]):
        raise SystemExit(
            f"{processed_dir} holds a validation hold-out: reference recipes train on every training image "
            "(use a processed folder made with preprocess.val_size: 0)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test"):
        split = splits[name]
        torch.save(
            {
                "images": torch.from_numpy(split.images),
                "labels": torch.from_numpy(split.labels),
                "classes": list(CLASS_NAMES),
            },
            folder / f"{name}.pt",
        )
    return len(splits["train"]), len(splits["test"])


def run_reference(
    recipe: Path,
    runs: int,
    source: str,
    processed_dir: Path = PROCESSED_DIR,
    timeout: float = 1800.0,
    origin: dict[str, str] | None = None,
    python: str = sys.executable,
    compile_mode: str | None = None,
) -> ReferenceEntry:
    """Run ``recipe`` in a scratch folder holding our data; stop it after ``runs`` timed runs.

    Unmodified, unless ``compile_mode`` asks for a copy whose ``mode="max-autotune"`` compiles use that
    mode instead (the entry's ``modification`` says so, and ``recipe_sha256`` is the original file's).
    """
    recipe = Path(recipe).resolve()
    if not recipe.is_file():
        raise SystemExit(f"reference recipe {recipe} not found: pass the path to its .py file")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    origin = origin or provenance(device, "run_reference()")
    rows: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="reference-") as scratch:
        n_train, n_test = write_recipe_data(processed_dir, Path(scratch) / "cifar10")
        script, modification = with_compile_mode(recipe, Path(scratch), compile_mode)
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            [python, str(script)], cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        tail: list[str] = []

        def lines() -> Iterator[str]:
            assert process.stdout is not None
            for line in process.stdout:
                tail.append(line)
                del tail[:-40]
                print(line, end="", flush=True)
                yield line
                if time.monotonic() > deadline:
                    return

        warmed_up = False
        try:
            for row in parse_recipe_rows(lines()):
                if row["run"] == "warmup":
                    warmed_up = True
                    continue
                rows.append(row)
                # A recipe without a warm-up run compiles in its first run: one more, and that one dropped.
                if len(rows) >= runs + (0 if warmed_up else 1):
                    break
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    if not warmed_up:
        rows = rows[1:]
    if len(rows) < runs:
        raise SystemExit(
            f"{recipe.name} finished {len(rows)} of {runs} runs (exit {process.returncode}); "
            "its last output:\n" + "".join(tail)
        )
    time_column = next(c for c in rows[0] if "time" in c)
    accuracies = [float(r["tta_val_acc"]) for r in rows]
    seconds = [float(r[time_column]) for r in rows]
    mean, std = _spread(accuracies)
    return ReferenceEntry(
        **origin,
        recipe=recipe.name,
        recipe_sha256=file_digest(recipe),
        source=source,
        runs=len(rows),
        accuracies=accuracies,
        accuracy_mean=mean,
        accuracy_std=std,
        seconds=seconds,
        seconds_median=statistics.median(seconds),
        timing=f"the recipe's own clock, as it prints it ({time_column}): CUDA events around training "
        "and the final evaluation, data already on the GPU, "
        + (FIRST_RUN_EXCLUDED if warmed_up else FIRST_TIMED_RUN_EXCLUDED),
        train_images=n_train,
        test_images=n_test,
        data=data_source(),
        modification=modification,
    )


FIRST_RUN_EXCLUDED = "first (warm-up/compile) run excluded"
FIRST_TIMED_RUN_EXCLUDED = "its first run excluded (the recipe has no warm-up run: the first one compiles)"


def without_first_run(entry: ReferenceEntry) -> ReferenceEntry:
    """``entry`` less its first run: for a recipe without a warm-up run measured before the runner dropped
    that run itself (``merge --drop-first-run``)."""
    if entry.runs < 2 or FIRST_RUN_EXCLUDED not in entry.timing:
        raise SystemExit(f"{entry.recipe}: cannot drop the first of {entry.runs} runs ({entry.timing})")
    accuracies, seconds = entry.accuracies[1:], entry.seconds[1:]
    mean, std = _spread(accuracies)
    return entry.model_copy(
        update={
            "runs": len(accuracies),
            "accuracies": accuracies,
            "accuracy_mean": mean,
            "accuracy_std": std,
            "seconds": seconds,
            "seconds_median": statistics.median(seconds),
            "timing": entry.timing.replace(FIRST_RUN_EXCLUDED, FIRST_TIMED_RUN_EXCLUDED),
        }
    )


_MAX_AUTOTUNE = re.compile(r"""mode\s*=\s*(["'])max-autotune\1""")


def with_compile_mode(recipe: Path, scratch: Path, mode: str | None) -> tuple[Path, str | None]:
    """``recipe`` itself, or a copy in ``scratch`` with its max-autotune compiles in ``mode``."""
    if mode is None:
        return recipe, None
    text, count = _MAX_AUTOTUNE.subn(f'mode="{mode}"', recipe.read_text())
    if not count:
        raise SystemExit(f"--compile-mode {mode}: {recipe.name} has no mode='max-autotune' compile to change")
    copy = scratch / recipe.name
    copy.write_text(text)
    places = f"{count} place" + ("s" if count > 1 else "")
    return copy, f"torch.compile mode 'max-autotune' set to '{mode}' ({places}), nothing else changed"


# ---------------------------------------------------------------------------------------------------------
# The parent model (ViT-B/16 at 224 px): what a fine-tune step costs, plain and as the profile trains it

PARENT_PROFILE = "parent_vit"
# The plain variant and the ones through our loop; the profile's own settings are one of them.
PARENT_VARIANTS: dict[str, dict[str, Any]] = {
    "our loop, eager": {"compile": False, "cuda_graphs": False},
    "our loop, compiled": {"compile": "default", "cuda_graphs": False},
    "our loop, compiled + CUDA graph (fused AdamW)": {"compile": "default", "cuda_graphs": True},
}


def write_parent_checkpoint(folder: Path) -> Path:
    """google/vit-base-patch16-224-in21k's architecture and image processor with random weights, saved as
    a checkpoint the fine-tune path loads like the Hub's (for machines that cannot download the weights)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    # ViTConfig's defaults are ViT-B/16 at 224 (hidden 768, 12 layers and heads, MLP 3072, patch 16); the
    # in21k checkpoint's processor normalises with mean = std = 0.5.
    model = ViTForImageClassification(ViTConfig(num_labels=21843))
    model.save_pretrained(folder)
    ViTImageProcessor(
        image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": 224, "width": 224}
    ).save_pretrained(folder)
    return folder


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _plain_eager(
    checkpoint: Path, batch_size: int, steps: int, device: torch.device
) -> tuple[float, float, float | None]:
    """(train images/s, inference images/s, peak GiB) of the plain fine-tune step: the checkpoint's forward
    with its own loss under bf16 autocast, torch's default AdamW, images already at 224 px."""
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(
        checkpoint,
        id2label=dict(enumerate(CLASS_NAMES)),
        label2id={name: index for index, name in enumerate(CLASS_NAMES)},
        ignore_mismatched_sizes=True,
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(pixel_values=x, labels=y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(pixel_values=x)

    def timed(fn: Callable[[], None], n: int) -> float:
        for _ in range(3):
            fn()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            fn()
        synchronize(device)
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_rate = batch_size * steps / timed(train_step, steps)
    peak = _peak_gib(device)
    model.eval()
    infer_rate = batch_size * steps / timed(infer_step, steps)
    return train_rate, infer_rate, peak


def _through_loop(
    params: Params, checkpoint: Path, settings: dict[str, Any], steps: int, device: torch.device
) -> tuple[float, float, float | None]:
    """(train images/s after the first epoch, first epoch s, peak GiB) of the train stage's own loop with the
    profile's params and ``settings``, on CIFAR-sized uint8 images (upsampled to 224 px in the step)."""
    hp = params.train.model_copy(update={"model": str(checkpoint), "epochs": 3, **settings})
    generator = torch.Generator().manual_seed(0)
    n = hp.batch_size * steps
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=generator).numpy()
    labels = torch.randint(0, 10, (n,), generator=generator).numpy()
    train = ArraySplit(images, labels, torch.arange(n).numpy())
    model = build_model(hp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train_classifier(model, train, None, hp, device, progress=False)
    later = result.history[1:]
    rate = sum(hp.batch_size * steps for _ in later) / sum(epoch.seconds for epoch in later)
    peak = _peak_gib(device)
    return rate, result.history[0].seconds, peak


def parent_vit_throughput(
    origin: dict[str, str],
    checkpoint: Path | None,
    batch_size: int,
    steps: int,
    only: list[str] | None = None,
) -> ParentVitEntry:
    """The parent model's training images/s and peak memory: plain bf16 eager, then our loop's variants
    (the profile's settings among them), one after another on one device."""
    params = load_profile(PARENT_PROFILE, [f"train.batch_size={batch_size}"])
    device = resolve_device(params.train.device)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = checkpoint or write_parent_checkpoint(Path(scratch) / "vit-in21k-random")
        plain_rate, infer_rate, plain_peak = _plain_eager(checkpoint, batch_size, steps, device)
        variants = [
            ThroughputVariant(
                name="plain bf16 eager (the checkpoint's forward and loss, torch's default AdamW)",
                settings={}, batch_size=batch_size, train_images_per_second=round(plain_rate, 1),
                first_epoch_seconds=None, train_peak_memory_gib=plain_peak, speedup_over_plain=1.0,
            )
        ]  # fmt: skip
        for name, settings in PARENT_VARIANTS.items():
            if only and name not in only:
                continue
            gc.collect()  # the previous variant's model, optimiser state and CUDA-graph pool
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                rate, first, peak = _through_loop(params, checkpoint, settings, steps, device)
            except (RuntimeError, torch.OutOfMemoryError) as exc:  # one variant failing leaves the others
                print(f"{name}: failed ({type(exc).__name__}: {str(exc)[:300]})", flush=True)
                continue
            variants.append(
                ThroughputVariant(
                    name=name, settings=settings, batch_size=batch_size,
                    train_images_per_second=round(rate, 1), first_epoch_seconds=round(first, 1),
                    train_peak_memory_gib=peak, speedup_over_plain=round(rate / plain_rate, 3),
                )
            )  # fmt: skip
            print(f"{name}: {rate:.0f} images/s ({rate / plain_rate:.2f}x plain), first epoch {first:.1f} s")
        parameters = sum(
            p.numel()
            for p in build_model(params.train.model_copy(update={"model": str(checkpoint)})).parameters()
        )
    return ParentVitEntry(
        **origin,
        model="ViT-B/16 at 224 px (google/vit-base-patch16-224-in21k's architecture, random weights), bf16",
        parameters=parameters,
        profile=PARENT_PROFILE,
        variants=variants,
        inference_images_per_second=round(infer_rate, 1),
    )


# ---------------------------------------------------------------------------------------------------------
# Saving and the report


def save(
    entries: dict[str, Entry], metrics_file: Path = BENCHMARK_RECORD, report_file: Path | None = None
) -> None:
    """Merge ``entries`` into ``metrics_file`` by name (and re-render the report beside it, if given)."""
    results = read_results(metrics_file) | entries
    payload = {name: entry.model_dump(mode="json") for name, entry in sorted(results.items())}
    with atomic_output(Path(metrics_file)) as staged:
        staged.write_text(json.dumps(payload, indent=2) + "\n")
    if report_file is not None:
        with atomic_output(Path(report_file)) as staged:
            staged.write_text(render_benchmark_report(read_results(metrics_file)))


def _measured(country_iso_code: str, out_file: Path) -> contextlib.AbstractContextManager:
    """codecarbon around the benchmark where it is installed (a bare GPU image may lack it)."""
    try:
        import codecarbon  # noqa: F401
    except ImportError:
        print("codecarbon is not installed: benchmark emissions not measured")
        return contextlib.nullcontext()
    from cifar10_pipeline.tracking.emissions import measure

    return measure("benchmark", country_iso_code, out_file)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--metrics-file", type=Path, default=BENCHMARK_RECORD)
    common.add_argument(
        "--report", type=Path, default=BENCHMARK_REPORT, help="re-rendered after each save ('' for none)"
    )
    common.add_argument("--processed-dir", type=Path, default=PROCESSED_DIR)
    verbs = parser.add_subparsers(dest="verb", required=True)

    run = verbs.add_parser("run", parents=[common], help="train and test-score a profile over seeds")
    run.add_argument("--profile", default="default")
    run.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    run.add_argument("--key", help="entry name (default: the profile)")
    run.add_argument("-S", "--set", action="append", default=[], help="override, e.g. -S train.epochs=12")

    select = verbs.add_parser("select", parents=[common], help="choose knobs on a validation hold-out")
    select.add_argument("--profile", required=True)
    select.add_argument("--grid", action="append", required=True, help="section.key=v1,v2 (repeatable)")
    select.add_argument("--seeds", type=int, default=4, help=f"seeds {SELECTION_SEED_START}..")
    select.add_argument("--key", help="entry name (default: select_<profile>)")
    select.add_argument("-S", "--set", action="append", default=[], help="override held fixed")
    select.add_argument(
        "--rule", choices=sorted(SELECTION_RULES), default="best",
        help="best: highest mean validation accuracy; one-se: the fastest within one standard error of it",
    )  # fmt: skip

    ref = verbs.add_parser("reference", parents=[common], help="run a published recipe on our data")
    ref.add_argument("recipe", type=Path, help="path to the recipe's .py file (its repository stays apart)")
    ref.add_argument("--runs", type=int, default=10)
    ref.add_argument("--source", required=True, help="where the recipe comes from, e.g. repo URL@commit")
    ref.add_argument("--key", help="entry name (default: reference_<recipe file stem>)")
    ref.add_argument("--timeout", type=float, default=1800.0)
    ref.add_argument(
        "--compile-mode",
        help="run a copy with every torch.compile mode='max-autotune' set to this mode instead (recorded in "
        "the entry's modification; e.g. default, whose compile takes a fraction of max-autotune's)",
    )

    parent = verbs.add_parser(
        "parent-vit", parents=[common], help="the parent model's fine-tune step: plain bf16 eager and ours"
    )
    parent.add_argument("--batch-size", type=int, default=512)
    parent.add_argument("--steps", type=int, default=20, help="steps timed per variant (ours: per epoch)")
    parent.add_argument(
        "--checkpoint", type=Path, help="the parent checkpoint (default: its architecture, random weights)"
    )
    parent.add_argument(
        "--variant", action="append", choices=sorted(PARENT_VARIANTS), help="only these of our variants"
    )
    checkpoint = verbs.add_parser(
        "parent-checkpoint", help="write the parent model's architecture with random weights (offline)"
    )
    checkpoint.add_argument("folder", type=Path)

    merge = verbs.add_parser("merge", help="merge entries written elsewhere into records/benchmark.json")
    merge.add_argument("files", type=Path, nargs="+")
    merge.add_argument(
        "--drop-first-run",
        action="append",
        default=[],
        metavar="KEY",
        help="drop reference entry KEY's first run (a recipe without a warm-up run compiles in it)",
    )
    merge.add_argument("--metrics-file", type=Path, default=BENCHMARK_RECORD)
    merge.add_argument("--report", type=Path, default=BENCHMARK_REPORT)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    report = getattr(args, "report", None)  # parent-checkpoint writes no record
    report = report if str(report) not in ("", ".", "None") else None
    if args.verb == "merge":
        entries: dict[str, Entry] = {}
        for path in args.files:
            entries |= read_results(path)
        for key in args.drop_first_run:
            entries[key] = without_first_run(entries[key])
        save(entries, args.metrics_file, report)
        print(f"merged {sorted(entries)} into {args.metrics_file}")
        return
    if getattr(args, "seeds", 1) < 1 or getattr(args, "runs", 1) < 1:
        parser.error("--seeds and --runs must be at least 1")
    command = "python benchmarks/training.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def keep(key: str) -> Callable[[Any], None]:
        return lambda entry: save({key: entry}, args.metrics_file, report)

    if args.verb == "run":
        params = load_profile(args.profile, args.set)
        device = resolve_device(params.train.device)
        key = args.key or args.profile
        # codecarbon's record lands in a scratch file: the entry carries what it measured.
        with tempfile.TemporaryDirectory() as scratch:
            emissions_file = Path(scratch) / "emissions.json"
            with _measured(params.emissions.country_iso_code, emissions_file):
                entry = benchmark_training(
                    params, list(range(args.seeds)), args.processed_dir, keep(key), args.set,
                    provenance(device, command),
                )  # fmt: skip
            if emissions_file.is_file():
                record = json.loads(emissions_file.read_text())
                entry.emissions = Emissions(**{k: record[k] for k in Emissions.model_fields})
        keep(key)(entry)
    elif args.verb == "select":
        params = load_profile(args.profile, args.set)
        origin = provenance(resolve_device(params.train.device), command)
        key = args.key or f"select_{args.profile}"
        entry = select_knobs(
            args.profile, parse_grid(args.grid), args.seeds, args.processed_dir, args.set,
            origin=origin, on_candidate=keep(key), rule=args.rule,
        )  # fmt: skip
        print(f"chosen on validation: {entry.chosen}")
    elif args.verb == "reference":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        entry = run_reference(
            args.recipe, args.runs, args.source, args.processed_dir, args.timeout,
            provenance(device, command), compile_mode=args.compile_mode,
        )  # fmt: skip
        keep(args.key or f"reference_{args.recipe.stem}")(entry)
    elif args.verb == "parent-checkpoint":
        print(f"wrote {write_parent_checkpoint(args.folder)}")
        return
    else:
        entry = parent_vit_throughput(
            provenance(resolve_device("cuda"), command),
            args.checkpoint,
            args.batch_size,
            args.steps,
            args.variant,
        )
        keep("parent_vit_throughput")(entry)
    print(entry.model_dump_json(indent=2))


if __name__ == "__main__":
    main()
