"""CI gates that can fail: the checks .ci/run (and .github/workflows/ci.yml) make around the quick run.

    python scripts/ci_gates.py lock-consistent           # fresh clone, before any run: dvc.lock matches
    python scripts/ci_gates.py fingerprint --out F --delete   # before `dvc exp run -S profile=quick`
    python scripts/ci_gates.py check-fresh --before F    # after it: every stage output written by this run
    python scripts/ci_gates.py check-quick               # the quick profile's image counts, accuracy gate
    python scripts/ci_gates.py dvc-status-clean          # nothing left for dvc to do
    python scripts/ci_gates.py record-baseline           # after a quick run: rewrite the quick baseline

Every gate exits 1 and says why when what it guards is broken; tests/unit/test_ci_gates.py makes each
one fail.
The stage outputs are read from dvc.yaml (every stage's outs, metrics and plots), so a new stage or output is
covered without editing this file. Run from the project root, like dvc.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

BASELINE_FILE = Path("records/ci_quick_baseline.json")
QUICK_PROFILE = "quick"
# How far below the quick baseline's accuracy a quick run may land before check-quick fails. The quick run is
# deterministic for a seed on one machine (two fp32 quick runs here gave the same validation accuracy at
# every epoch, to the last digit), but not across machines: another CPU's kernels (bf16 in hardware or fp32,
# another BLAS path) round differently, and over 4 epochs of SGD those differences grow into what a change of
# seed does. What bounds that: the binomial standard error of the baseline's 0.6175 on 2,000 test images is
# 0.011; the same seed in bf16 instead of fp32 arithmetic moved validation accuracy by 0.008 and 0.010 after
# epochs 1 and 2 (the baseline file's `also_measured`). 0.05 is 4-5 standard errors: wide enough that a sound
# change on other hardware passes, narrow enough that a change costing 5 of the quick profile's ~62 points
# fails (the old fixed 0.40 let a model 20 points worse through).
ACCURACY_MARGIN = 0.05
# A file's mtime can be stored at a coarser tick than time.time(): allow 1 s so a file written right after the
# fingerprint cannot read as older than it. (Nothing else writes the outputs in that second: the fingerprint
# is taken, then they are deleted, then dvc starts.)
MTIME_SLACK_S = 1.0
DVC_TIMEOUT_S = 300
# What `dvc status --json` may say about a DVC-cached output (cache: true) in a fresh clone: its data is in no
# cache yet ("not in cache"), or not in the workspace ("deleted", also as a dependency of the next stage).
FRESH_CLONE_STATES = {"not in cache", "deleted"}


# What the baseline keeps of a quick run: the metrics the PR report shows (and the gate reads), by name, so
# every key of records/ci_quick_baseline.json is one this file writes
# (tests/unit/test_metrics_written_by_code.py).
BASELINE_METRICS: dict[str, tuple[str, ...]] = {
    "metrics/eval.json": (
        "accuracy",
        "f1_macro",
        "f1_weighted",
        "test_images",
        "ece",
        "nll",
        "class_gap.worst_class",
        "class_gap.worst_f1",
        "class_gap.best_class",
        "robustness.mean_corrupted_accuracy",
        "inference.images_per_second",
    ),
    "metrics/train.json": (
        "train_images",
        "epochs",
        "steps",
        "val_accuracy",
        "val_loss",
        "train_loss",
        "train_seconds",
        "train_images_per_second",
        "device",
        "torch",
    ),
    "metrics/emissions.json": ("energy_kwh", "emissions_kg", "duration_s"),
}
HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")


class GateError(Exception):
    """An input a gate needs is missing or malformed (as opposed to a gate that ran and failed)."""


# ---------------------------------------------------------------------------------------------------------
# The stage outputs dvc.yaml declares
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    path: str  # relative to the project root, as dvc.yaml writes it
    stage: str
    cached: bool  # cache: true (data and models, DVC cache) or false (metrics and reports, kept in git)


def load_stages(root: Path) -> dict[str, dict[str, Any]]:
    path = root / "dvc.yaml"
    if not path.is_file():
        raise GateError(f"{path} not found: run from the project root")
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    for name, stage in stages.items():
        # foreach/matrix stages expand to several; reading them here would need DVC's own resolver.
        if not isinstance(stage, dict) or "cmd" not in stage:
            raise GateError(f"dvc.yaml: stage {name!r} has no plain cmd (foreach/matrix?): not supported")
    return stages


def _entries(items: Iterable[Any] | None) -> Iterable[tuple[str, dict[str, Any]]]:
    """(path, options) of each item of an outs/metrics/plots list: a string or a one-key mapping."""
    for item in items or []:
        if isinstance(item, str):
            yield item, {}
        elif isinstance(item, dict):
            for path, options in item.items():
                yield str(path), options or {}


def declared_outputs(root: Path) -> list[Output]:
    outputs = []
    for name, stage in load_stages(root).items():
        wdir = Path(stage.get("wdir", "."))
        for key in ("outs", "metrics", "plots"):
            for path, options in _entries(stage.get(key)):
                relative = os.path.normpath(wdir / path)
                outputs.append(Output(relative, name, bool(options.get("cache", True))))
    return outputs


def _param_keys(stage: dict[str, Any]) -> list[str | None]:
    """The params.yaml keys a stage declares (dotted); None for a key of another params file."""
    keys: list[str | None] = []
    for entry in stage.get("params") or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):  # {params_file: [keys]}
            for file, names in entry.items():
                keys.extend(str(n) if file == "params.yaml" else None for n in names or [])
    return keys


def _output_paths(stage: dict[str, Any]) -> list[str]:
    return [path for key in ("outs", "metrics", "plots") for path, _ in _entries(stage.get(key))]


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


_ABSENT = object()


def _lookup(params: dict[str, Any], dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def stages_changed_by(
    stages: dict[str, dict[str, Any]], before: dict[str, Any], after: dict[str, Any]
) -> set[str]:
    """Stages whose results can differ between params ``before`` and ``after`` (raw params.yaml contents).

    A stage is changed when a value it reads differs (params.yaml holds resolved values: `dvc exp run -S
    profile=quick` composes the profile into the sections, changing preprocess's caps and train's epochs, not
    the download or validate sections), or when it depends on an output of a changed stage. A key of another
    params file is not compared (there is none in this project); its stage counts as unchanged.
    """
    changed = {
        name
        for name, stage in stages.items()
        for key in _param_keys(stage)
        if key is not None and _lookup(before, key) != _lookup(after, key)
    }
    grew = True
    while grew:  # to a fixed point: dvc.yaml need not list stages in pipeline order
        grew = False
        outs = [path for name in changed for path in _output_paths(stages[name])]
        for name, stage in stages.items():
            deps = [str(d) for d in stage.get("deps") or []]
            if name not in changed and any(_overlaps(d, o) for d in deps for o in outs):
                changed.add(name)
                grew = True
    return changed


def outputs_that_may_match(root: Path, before: dict[str, Any]) -> set[str]:
    """Outputs of stages the run's params do not change (vs the params recorded in ``before``)."""
    stages = load_stages(root)
    params_before = before.get("params")
    if not isinstance(params_before, dict):
        return set()  # nothing recorded: every output must change
    params_after = yaml.safe_load((root / "params.yaml").read_text())
    changed = stages_changed_by(stages, params_before, params_after)
    return {o.path for o in declared_outputs(root) if o.stage not in changed}


# ---------------------------------------------------------------------------------------------------------
# fingerprint / check-fresh
# ---------------------------------------------------------------------------------------------------------


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest(path: Path) -> str | None:
    """sha256 of a file, or of a folder's (relative path, file sha256) list; None when absent or empty."""
    files = _files(path)
    if not files:
        return None
    if path.is_file():
        return _sha256(path)
    listing = "".join(f"{f.relative_to(path).as_posix()}\0{_sha256(f)}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _inside(root: Path, relative: str) -> Path:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise GateError(f"{relative} is outside the project: refusing to touch it")
    return path


def fingerprint(root: Path, paths: Sequence[str], delete: bool = False) -> dict[str, Any]:
    """The content of each output before the run and when it was taken; with ``delete``, then removes them.

    Deleting every output is what makes presence afterwards mean something: dvc re-runs a stage whose outputs
    are missing, so even a stage the quick profile does not change (download, validate) must run again and
    write its outputs anew, and a committed file the run did not write is absent, not silently passed.
    """
    params = root / "params.yaml"
    record = {
        "taken_at": time.time(),
        # what the committed outputs were made with: check-fresh compares the run's params with these
        "params": yaml.safe_load(params.read_text()) if params.is_file() else None,
        "outputs": {p: digest(_inside(root, p)) for p in paths},
        "deleted": [],
    }
    if delete:
        for relative in paths:
            path = _inside(root, relative)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
                record["deleted"].append(relative)
            elif path.exists() or path.is_symlink():
                path.unlink()
                record["deleted"].append(relative)
    return record


def check_fresh(
    root: Path, before: dict[str, Any], paths: Sequence[str], may_match: set[str]
) -> tuple[list[str], list[str]]:
    """(problems, notes): each output must exist, be written after the fingerprint, and differ from before.

    Three checks, each catching what the others miss:
    - it exists (not empty): with the outputs deleted first, a stage that did not run leaves a hole;
    - every file's mtime is after the fingerprint: an old copy restored with its timestamp (a hard link or a
      preserving copy from a cache) or a committed file the run left alone (if the deletion step is dropped);
    - its content differs from before, unless the run's params do not change its stage (``may_match``, see
      stages_changed_by): a committed default-profile result put back after the run (git checkout writes a
      new mtime) cannot pass as the quick run's. The quick profile overrides nothing download and validate
      read, so their outputs (data/raw, metrics/data_source.json, metrics/validation.json) are rightly
      byte-identical to the committed ones; for them freshness rests on the deletion and the mtime.
    """
    problems: list[str] = []
    notes: list[str] = []
    recorded: dict[str, str | None] = before.get("outputs", {})
    taken_at = float(before["taken_at"]) - MTIME_SLACK_S
    for relative in paths:
        if relative not in recorded:
            problems.append(f"{relative}: not fingerprinted before the run (run `fingerprint` first)")
            continue
        path = root / relative
        now = digest(path)
        if now is None:
            problems.append(f"{relative}: missing or empty after the run: its stage did not write it")
            continue
        stale = [f for f in _files(path) if f.stat().st_mtime < taken_at]
        if stale:
            shown = ", ".join(f.relative_to(root).as_posix() for f in stale[:3])
            problems.append(
                f"{relative}: {len(stale)} file(s) older than the run (not written by it): {shown}"
            )
            continue
        old = recorded[relative]
        if old is None:
            notes.append(f"{relative}: written by the run (absent before)")
        elif old != now:
            notes.append(f"{relative}: written by the run (content changed)")
        elif relative in may_match:
            notes.append(
                f"{relative}: rewritten by the run, same content (the run's params do not change it)"
            )
        else:
            problems.append(f"{relative}: same content as before the run: not this run's result")
    return problems, notes


# ---------------------------------------------------------------------------------------------------------
# check-quick
# ---------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise GateError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GateError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise GateError(f"{path}: expected a JSON object")
    return data


def expected_quick(raw_params: dict[str, Any]) -> dict[str, Any]:
    """Image counts and epochs that params (the quick run's params.yaml) ask for, validated by the project's
    own params loader."""
    from cifar10_pipeline.core.params import validate_params

    params = validate_params(raw_params)
    pre = params.preprocess
    raw = params.validation.split_sizes()
    # Same rule as the preprocess stage (a cap, or the whole split when null), from the params alone.
    kept_train = min(pre.max_train_images or raw["train"], raw["train"])
    return {
        "images": {
            "train": kept_train - pre.val_size,
            "val": pre.val_size,
            "test": min(pre.max_test_images or raw["test"], raw["test"]),
        },
        "epochs": float(params.train.epochs),
    }


Json = dict[str, Any]


def run_counts(evaluation: Json, train: Json, processed: Json) -> dict[str, Any]:
    """What the run itself reports: the images each stage saw and the epochs trained."""
    images = processed.get("images") or {}
    return {
        "eval test_images": evaluation.get("test_images"),
        "train train_images": train.get("train_images"),
        "preprocess train": images.get("train"),
        "preprocess val": images.get("val"),
        "preprocess test": images.get("test"),
        "train epochs": train.get("epochs"),
    }


def count_problems(
    raw_params: Json, evaluation: Json, train: Json, processed: Json, profile: str = QUICK_PROFILE
) -> list[str]:
    """The run is ``profile``'s: params.yaml names it, every stage saw the images and epochs it sets."""
    problems: list[str] = []
    if raw_params.get("profile") != profile:
        problems.append(f"params.yaml says profile {raw_params.get('profile')!r}, not {profile!r}")
    want = expected_quick(raw_params)
    expected = {
        "eval test_images": want["images"]["test"],
        "train train_images": want["images"]["train"],
        "preprocess train": want["images"]["train"],
        "preprocess val": want["images"]["val"],
        "preprocess test": want["images"]["test"],
        "train epochs": want["epochs"],
    }
    for name, got in run_counts(evaluation, train, processed).items():
        if got != expected[name]:
            problems.append(f"{name} = {got}, the {profile} profile asks for {expected[name]}")
    return problems


def check_quick(
    raw_params: Json,
    evaluation: Json,
    train: Json,
    processed: Json,
    baseline: Json,
    margin: float = ACCURACY_MARGIN,
    profile: str = QUICK_PROFILE,
) -> tuple[list[str], list[str]]:
    """(problems, notes): the run is the quick profile's (counts, epochs), no worse than its baseline."""
    problems = count_problems(raw_params, evaluation, train, processed, profile)
    want = expected_quick(raw_params)
    notes = [] if problems else [f"image counts and epochs are the {profile} profile's: {want}"]
    # Like with like: a baseline measured on other counts says nothing about this run.
    if baseline.get("profile") != profile:
        problems.append(f"baseline is of profile {baseline.get('profile')!r}, not {profile!r}")
    if baseline.get("images") != want["images"] or baseline.get("epochs") != want["epochs"]:
        problems.append(
            f"baseline was measured on images {baseline.get('images')}, epochs {baseline.get('epochs')}; the "
            f"{profile} profile now asks for {want['images']}, epochs {want['epochs']}: re-record it "
            "(python scripts/ci_gates.py record-baseline after a quick run)"
        )
    accuracy = evaluation.get("accuracy")
    reference = baseline.get("accuracy")
    if not isinstance(accuracy, int | float) or not 0.0 <= accuracy <= 1.0:
        problems.append(f"metrics/eval.json accuracy is {accuracy!r}, not a number in [0, 1]")
    elif not isinstance(reference, int | float):
        problems.append(f"baseline accuracy is {reference!r}, not a number")
    else:
        threshold = reference - margin
        line = (
            f"accuracy {accuracy:.4f} vs quick baseline {reference:.4f} "
            f"(threshold {threshold:.4f} = baseline - margin {margin})"
        )
        (problems if accuracy < threshold else notes).append(line)
    return problems, notes


# ---------------------------------------------------------------------------------------------------------
# dvc status
# ---------------------------------------------------------------------------------------------------------


def dvc_status(root: Path) -> dict[str, Any]:
    """``dvc status --json`` of the project at ``root`` (the interpreter's dvc: the pinned one)."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=DVC_TIMEOUT_S,
    )
    if done.returncode != 0:
        raise GateError(f"dvc status failed ({done.returncode}):\n{done.stderr}")
    # dvc prints nothing but the JSON on stdout; warnings go to stderr.
    text = done.stdout.strip() or "{}"
    try:
        status = json.loads(text)
    except json.JSONDecodeError:
        raise GateError(f"dvc status --json printed no JSON:\n{text}") from None
    if not isinstance(status, dict):
        raise GateError(f"dvc status --json printed {text!r}, not an object")
    return status


def describe(stage: str, entry: Any) -> list[str]:
    """One line per thing `dvc status --json` says changed about ``stage``."""
    if not isinstance(entry, dict):
        return [f"{stage}: {entry}"]
    lines = []
    for kind, changes in entry.items():
        for path, state in changes.items() if isinstance(changes, dict) else [("?", changes)]:
            # a params file's state is {param: state}, e.g. {"train": "modified"}
            shown = ", ".join(f"{k} {v}" for k, v in state.items()) if isinstance(state, dict) else state
            lines.append(f"{stage}: {kind}: {path}: {shown}")
    return lines


def status_problems(status: dict[str, Any]) -> list[str]:
    """Everything ``dvc status --json`` reports: after a run, anything at all is a problem."""
    lines: list[str] = []
    for stage, entries in status.items():
        for entry in entries or ["(changed)"]:
            lines.extend(describe(stage, entry))
    return lines


def lock_problems(status: dict[str, Any], outputs: Sequence[Output]) -> list[str]:
    """What in a fresh clone's ``dvc status --json`` means the committed dvc.lock is not the code's.

    A fresh clone has none of the DVC-cached outputs (cache: true: data/raw, data/processed, models/cifar10):
    dvc reports them "not in cache" as outputs and "deleted" as dependencies of the next stage. That, and
    only that, is allowed. A changed code dependency, a changed params.yaml value ({"params.yaml": {...}}), a
    changed command, a new stage, or a git-tracked output (cache: false) that is modified or missing means
    the results committed with dvc.lock were not produced by the committed code and params.
    """
    cached = [o.path for o in outputs if o.cached]
    problems: list[str] = []
    for stage, entries in status.items():
        for entry in entries or [None]:
            if not isinstance(entry, dict):
                problems.append(f"{stage}: {entry}")
                continue
            for kind, changes in entry.items():
                if kind not in ("changed outs", "changed deps") or not isinstance(changes, dict):
                    problems.extend(describe(stage, {kind: changes}))
                    continue
                for path, state in changes.items():
                    allowed = isinstance(state, str) and state in FRESH_CLONE_STATES
                    if not (allowed and any(_overlaps(path, c) for c in cached)):
                        problems.extend(describe(stage, {kind: {path: state}}))
    return problems


# ---------------------------------------------------------------------------------------------------------
# record-baseline
# ---------------------------------------------------------------------------------------------------------


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalars of a nested JSON object as dotted keys (lists left out), as `dvc metrics` names them."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif not isinstance(value, list):
            flat[name] = value
    return flat


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60)
    return done.stdout.strip() if done.returncode == 0 else ""


def _history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    return [
        {k: float(row[k]) for k in HISTORY_COLUMNS if row.get(k) not in (None, "")}
        for row in csv.DictReader(path.read_text().splitlines())
    ]


def _kept(data: Json, names: Sequence[str]) -> Json:
    flat = flatten(data)
    return {name: flat[name] for name in names if name in flat}


def _recalls(evaluation: Json) -> Json:
    """Recall per class ("per_class.<class>.recall"), for the PR report's confusion table."""
    return {
        k: v for k, v in flatten(evaluation).items() if k.startswith("per_class.") and k.endswith(".recall")
    }


def also_measured(items: Sequence[str]) -> list[Json]:
    """``LABEL=ACCURACY`` pairs (other runs measured alongside the baseline, e.g. other seeds)."""
    runs = []
    for item in items:
        label, _, value = item.rpartition("=")
        if not label:
            raise GateError(f"--also-measured {item!r}: expected LABEL=ACCURACY")
        runs.append({"run": label, "accuracy": float(value)})
    return runs


def record_baseline(
    root: Path, command: str, run_seconds: float | None, others: list[Json] | None = None
) -> dict[str, Any]:
    """The quick baseline from the quick run in ``root``'s workspace, with where and how it was made."""
    from cifar10_pipeline.core.params import validate_params
    from cifar10_pipeline.core.provenance import tree_provenance

    raw_params = yaml.safe_load((root / "params.yaml").read_text())
    evaluation = read_json(root / "metrics/eval.json")
    train = read_json(root / "metrics/train.json")
    processed = read_json(root / "metrics/processed_validation.json")
    emissions = read_json(root / "metrics/emissions.json")
    problems = count_problems(raw_params, evaluation, train, processed)
    if problems:
        raise GateError("the workspace holds no complete quick run: " + "; ".join(problems))
    want = expected_quick(raw_params)
    code_changes = _git(root, "status", "--porcelain", "--untracked-files=no", "--", "src", "dvc.yaml")
    baseline: dict[str, Any] = {
        "about": "Quick-profile results that .ci/run's check-quick gate and the PR report compare a quick "
        "run with (like with like). Written by scripts/ci_gates.py record-baseline; do not edit by hand.",
        "profile": QUICK_PROFILE,
        "accuracy": evaluation["accuracy"],
        "f1_macro": evaluation.get("f1_macro"),
        "images": want["images"],
        "epochs": want["epochs"],
        "accuracy_margin": ACCURACY_MARGIN,
        "provenance": {
            "machine": cpu_model(),
            "cpu_count": os.cpu_count(),
            "train_device": train.get("device"),
            "torch": importlib.metadata.version("torch"),
            "python": platform.python_version(),
            **tree_provenance(root).fields(),  # the commit read from the tree (core/provenance.py)
            "uncommitted_code_changes": code_changes.splitlines(),
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": command,
            "run_seconds": run_seconds,
        },
        "also_measured": others or [],
        "params": validate_params(raw_params).as_flat_dict(),
        "metrics": {
            "metrics/eval.json": _kept(evaluation, BASELINE_METRICS["metrics/eval.json"])
            | _recalls(evaluation),
            "metrics/train.json": _kept(train, BASELINE_METRICS["metrics/train.json"]),
            "metrics/emissions.json": _kept(emissions, BASELINE_METRICS["metrics/emissions.json"]),
        },
        "history": _history(root / "metrics/train_history.csv"),
    }
    return baseline


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _report(title: str, problems: list[str], notes: Sequence[str] = ()) -> int:
    for note in notes:
        print(f"  ok: {note}")
    for problem in problems:
        print(f"  FAIL: {problem}")
    print(f"{title}: {'FAIL' if problems else 'ok'}")
    return 1 if problems else 0


def _paths(root: Path, given: Sequence[str]) -> list[str]:
    return list(given) or [o.path for o in declared_outputs(root)]


def cmd_fingerprint(args: argparse.Namespace) -> int:
    record = fingerprint(args.root, _paths(args.root, args.paths), delete=args.delete)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    present = sum(v is not None for v in record["outputs"].values())
    print(
        f"fingerprint: {len(record['outputs'])} outputs ({present} present) -> {args.out}"
        + (f"; deleted {len(record['deleted'])}" if args.delete else "")
    )
    return 0


def cmd_check_fresh(args: argparse.Namespace) -> int:
    before = read_json(Path(args.before))
    may_match = outputs_that_may_match(args.root, before)
    problems, notes = check_fresh(args.root, before, _paths(args.root, args.paths), may_match)
    return _report("check-fresh (every stage output written by this run)", problems, notes)


def cmd_check_quick(args: argparse.Namespace) -> int:
    root = args.root
    problems, notes = check_quick(
        yaml.safe_load((root / "params.yaml").read_text()),
        read_json(root / "metrics/eval.json"),
        read_json(root / "metrics/train.json"),
        read_json(root / "metrics/processed_validation.json"),
        read_json(root / args.baseline),
        margin=args.margin,
    )
    return _report("check-quick (quick profile's image counts and accuracy)", problems, notes)


def cmd_dvc_status_clean(args: argparse.Namespace) -> int:
    return _report("dvc-status-clean (dvc status --json is {})", status_problems(dvc_status(args.root)))


def split_known_stale(problems: list[str], known_stale: Sequence[str]) -> tuple[list[str], list[str]]:
    """(problems that fail the gate, problems of the stages declared stale). A stage declared stale that
    is not stale fails too: the declaration must go once a `dvc repro` has brought the stage up to date."""
    stage_of = {problem: problem.split(":", 1)[0] for problem in problems}
    excused = [p for p in problems if stage_of[p] in known_stale]
    failing = [p for p in problems if stage_of[p] not in known_stale]
    failing += [
        f"{stage}: declared stale (--known-stale) but dvc.lock matches it: drop the declaration"
        for stage in known_stale
        if stage not in stage_of.values()
    ]
    return failing, excused


def cmd_lock_consistent(args: argparse.Namespace) -> int:
    problems = lock_problems(dvc_status(args.root), declared_outputs(args.root))
    failing, excused = split_known_stale(problems, args.known_stale)
    if excused:
        print(f"  KNOWN STALE ({args.because}):")
        for problem in excused:
            print(f"    {problem}")
    return _report("lock-consistent (dvc.lock matches the committed code and params)", failing)


def cmd_record_baseline(args: argparse.Namespace) -> int:
    command = args.command or "dvc exp run -S profile=quick && " + shlex.join(["python", *sys.argv])
    baseline = record_baseline(args.root, command, args.run_seconds, also_measured(args.also_measured))
    out = args.root / args.out
    out.write_text(json.dumps(baseline, indent=2) + "\n")
    print(f"record-baseline: accuracy {baseline['accuracy']:.4f}, images {baseline['images']} -> {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="project root (default: .)")
    sub = parser.add_subparsers(dest="command_name", required=True)

    p = sub.add_parser("fingerprint", help="record each stage output's sha256 (or absence) before the run")
    p.add_argument("--out", required=True, help="JSON file to write (keep it outside the outputs)")
    p.add_argument("--delete", action="store_true", help="then delete the outputs, so the run must rewrite")
    p.add_argument("paths", nargs="*", help="outputs (default: every out, metric and plot in dvc.yaml)")
    p.set_defaults(func=cmd_fingerprint)

    p = sub.add_parser("check-fresh", help="fail unless every output was written by the run")
    p.add_argument("--before", required=True, help="the fingerprint file")
    p.add_argument("paths", nargs="*", help="outputs (default: every out, metric and plot in dvc.yaml)")
    p.set_defaults(func=cmd_check_fresh)

    p = sub.add_parser("check-quick", help="fail unless the run is the quick profile's and accurate enough")
    p.add_argument("--baseline", type=Path, default=BASELINE_FILE)
    p.add_argument("--margin", type=float, default=ACCURACY_MARGIN)
    p.set_defaults(func=cmd_check_quick)

    p = sub.add_parser("dvc-status-clean", help="fail unless `dvc status --json` is {}")
    p.set_defaults(func=cmd_dvc_status_clean)

    p = sub.add_parser("lock-consistent", help="fresh clone: fail unless dvc.lock matches code and params")
    p.add_argument(
        "--known-stale",
        nargs="+",
        default=[],
        metavar="STAGE",
        help="stages whose dvc.lock entry is known to be stale (printed, not failed); each must be stale",
    )
    p.add_argument("--because", default="", help="why those stages could not be re-run (required with them)")
    p.set_defaults(func=cmd_lock_consistent)

    p = sub.add_parser("record-baseline", help="write the quick baseline from the workspace's quick run")
    p.add_argument("--out", type=Path, default=BASELINE_FILE)
    p.add_argument("--run-seconds", type=float, help="wall time of the quick run, for the record")
    p.add_argument("--command", help="how the run was made (default: this command line)")
    p.add_argument(
        "--also-measured",
        action="append",
        default=[],
        metavar="LABEL=ACCURACY",
        help="another quick run measured alongside (another seed, other arithmetic), for the margin's record",
    )
    p.set_defaults(func=cmd_record_baseline)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except GateError as exc:
        print(f"{args.command_name}: FAIL: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
