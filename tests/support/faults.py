"""What the fault tests share: the tiny real run, the kill points, clones of the project and how to compare
a run's outputs with an uninterrupted run's.

Used by tests/integration/test_faults.py (each kill from one prepared checkout, in ``make test``) and by
tests/release/test_kill_chain.py (every kill in turn in one checkout, the release check).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .mirrors import SMALL_MIRROR_PARAMS

PROJECT_ROOT = Path(__file__).resolve().parents[2]

INJECTION = PROJECT_ROOT / "tests" / "support" / "fault_injection"

# A tiny real run on the small mirror (tests/support/mirrors.py): seconds per stage.
TINY = (
    *SMALL_MIRROR_PARAMS,
    "profile=quick",
    "preprocess.max_train_images=400",
    "preprocess.val_size=100",
    "preprocess.max_test_images=100",
    "train.epochs=2",
    "train.batch_size=50",
    "train.widths=[16,32,32]",
    "train.tta_level=0",
    "evaluate.robustness_images=20",
    "evaluate.batch_size=100",
    "evaluate.gallery_per_class=1",
    "download.sources=[mirror]",
)
STEPS_PER_EPOCH = 6  # 300 training images (400 less the 100 held out) in batches of 50


@dataclass(frozen=True)
class Kill:
    stage: str
    point: str  # tests/support/fault_injection/sitecustomize.py's point
    case: str  # for reports/reliability.md
    group: bool = False  # the whole `dvc repro` process group dies, not the stage alone
    prepare: tuple[str, ...] = ()  # outputs deleted first, so that DVC runs a stage whose lock entry holds


# In pipeline order: each `dvc repro` re-runs the stage killed before and runs on to the next kill.
KILLS = (
    Kill("download", "copy=2", "SIGKILL of download while it copies a Parquet shard (half copied)"),
    Kill("download", "write_text=data_source.json", "SIGKILL of download while it writes data_source.json"),
    Kill(
        "validate",
        "write_text=validation.json",
        "SIGKILL of validate while it writes metrics/validation.json",
        prepare=("metrics/validation.json",),
    ),
    Kill("preprocess", "savez=val.npz", "SIGKILL of preprocess while it writes data/processed/val.npz"),
    Kill(
        "train",
        f"train_step_group={STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2}",
        "SIGKILL of the whole `dvc repro` (process group) mid-epoch 2 of training",
        group=True,
    ),
    Kill("train", "safetensors", "SIGKILL of train while it writes model.safetensors (half written)"),
    Kill("train", "write_text=train.json", "SIGKILL of train while it writes metrics/train.json"),
    Kill("evaluate", "savefig=reliability.png", "SIGKILL of evaluate while it writes a figure"),
    Kill(
        "evaluate",
        "register",
        "SIGKILL of evaluate after its outputs, while it registers the model in MLflow",
    ),
    Kill("emissions", "write_text=emissions.md", "SIGKILL of emissions while it writes reports/emissions.md"),
    Kill(
        "model_card",
        "write_text=model_card.md",
        "SIGKILL of model_card while it writes reports/model_card.md",
    ),
)

# Outputs whose content is measured, not computed: compared with these values left out.
TIMING_KEYS = {
    "train_seconds",
    "train_images_per_second",
    "train_images_per_second_after_first_epoch",
    "train_peak_gpu_memory_gib",
    "stage_wall_seconds",
    "seconds",
    "images_per_second",
}
MEASURED_JSON = {"metrics/train.json", "metrics/eval.json"}
ENERGY_JSON = {"metrics/emissions.json", "metrics/emissions/train.json", "metrics/emissions/evaluate.json"}
MASKED_TEXT = {"reports/emissions.md", "reports/model_card.md"}  # every number masked
TIMED_CSV = {"metrics/train_history.csv": "seconds"}
DATA_DOCS = "reports/data_docs"  # Great Expectations names its run folders and pages after the time
TIMESTAMP = re.compile(r"\d{8}T\d{6}\.\d+Z")
MEASURED = {
    **{path: f"without {sorted(TIMING_KEYS)}" for path in MEASURED_JSON},
    **{path: "without the measured energy, CO2 and seconds" for path in ENERGY_JSON},
    **{path: "with every number masked (emissions and timings quoted)" for path in MASKED_TEXT},
    "metrics/train_history.csv": "without the seconds column",
    DATA_DOCS: "file names with the run timestamps masked; pages not compared",
}


def declared_outputs(root: Path, stage_name: str | None = None) -> list[str]:
    """Every out, metric and plot file or folder dvc.yaml declares (of one stage, when named)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    paths = []
    for name, stage in spec["stages"].items():
        if stage_name not in (None, name):
            continue
        for section in ("outs", "metrics", "plots"):
            for entry in stage.get(section, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


def _without(value: object, keys: set[str]) -> object:
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def _floats_masked(value: object) -> object:
    if isinstance(value, dict):
        return {k: _floats_masked(v) for k, v in value.items()}
    return "<measured>" if isinstance(value, float) else value


def comparable(root: Path, relative: str) -> object:
    """What of ``root/relative`` must equal the baseline's (see MEASURED)."""
    path = root / relative
    if relative == DATA_DOCS:
        return sorted(TIMESTAMP.sub("<time>", p.relative_to(path).as_posix()) for p in path.rglob("*"))
    if path.is_dir():
        return {
            p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
        }
    if relative in MEASURED_JSON:
        return _without(json.loads(path.read_text()), TIMING_KEYS)
    if relative in ENERGY_JSON:
        return _floats_masked(json.loads(path.read_text()))
    if relative in MASKED_TEXT:
        return re.sub(r"\d+(\.\d+)?", "#", path.read_text())
    if relative in TIMED_CSV:
        with open(path, newline="") as handle:
            return [
                {k: v for k, v in row.items() if k != TIMED_CSV[relative]} for row in csv.DictReader(handle)
            ]
    return path.read_bytes()


def differences(first: Path, second: Path, paths: list[str]) -> list[str]:
    """The outputs present in ``second`` that are not what they are in ``first``."""
    problems = []
    for relative in paths:
        if not (second / relative).exists():
            continue
        if not (first / relative).exists():
            problems.append(f"{relative}: exists, but not in the baseline")
        else:
            try:
                same = comparable(first, relative) == comparable(second, relative)
            except (ValueError, UnicodeDecodeError) as exc:  # a half-written JSON or CSV
                same, relative = False, f"{relative} ({type(exc).__name__}: {exc})"
            if not same:
                problems.append(f"{relative}: differs from the baseline (incomplete or different)")
    return problems


def env_for(clone: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_", "MLFLOW_", "CODECARBON"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(clone / "src"),
        MLFLOW_TRACKING_URI=f"sqlite:///{clone / 'mlflow.db'}",
        MPLBACKEND="Agg",
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def make_clone(target: Path, mirror: Path) -> Path:
    """A clone of the committed project with params.yaml composed for the tiny run."""
    subprocess.run(["git", "clone", "--quiet", str(PROJECT_ROOT), str(target)], check=True, timeout=120)
    subprocess.run(
        [sys.executable, "-m", "cifar10_pipeline.core.params", *TINY, f"download.mirror_dir={mirror}"],
        cwd=target,
        env=env_for(target),
        check=True,
        capture_output=True,
        timeout=120,
    )
    return target


def dvc_repro(
    clone: Path, env: dict[str, str], *args: str, timeout: float = 900
) -> subprocess.CompletedProcess:
    """``dvc repro [args]`` in its own process group (so that a fault may kill the group, not pytest)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", *args],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"dvc repro ran past {timeout}s:\n{output[-3000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


def delete_outputs(clone: Path, outputs: list[str]) -> None:
    """The committed results (the default profile's) deleted, so that every output a test sees was written
    by the tiny run."""
    for relative in outputs:
        path = clone / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def copy_checkout(source: Path, target: Path) -> Path:
    """A copy of a prepared checkout (git, DVC cache and lock, outputs) with an MLflow store of its own: the
    copy's runs must not land in the source's store, nor its artifacts in the source's folder."""
    shutil.copytree(source, target, symlinks=True)
    (target / "mlflow.db").unlink(missing_ok=True)
    shutil.rmtree(target / "mlruns", ignore_errors=True)
    return target


def mlflow_statuses(clone: Path) -> dict[str, int]:
    """How many runs of the clone's MLflow store are in each status."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar10")
    runs = client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []
    by_status: dict[str, int] = {}
    for run in runs:
        by_status[run.info.status] = by_status.get(run.info.status, 0) + 1
    return by_status


def dvc_status(clone: Path, *targets: str) -> dict:
    """``dvc status --json`` (of ``targets`` and what they depend on, when given): {} when nothing changed."""
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", *targets],
        cwd=clone,
        env=env_for(clone),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(status.stdout)


def scratch_leftovers(clone: Path) -> list[Path]:
    """Scratch folders of a killed write (atomic_output's ``*.partial``) outside git and the DVC cache."""
    return [p for p in clone.rglob("*.partial") if ".dvc" not in p.parts and ".git" not in p.parts]
