"""The train stage from a fresh process, as dvc runs it: records/cold_start.json (rendered into docs/gpu.md).

    python benchmarks/cold_start.py --profile gpu_fast -S train.tta_fraction=1.0

It rewrites params.yaml, the train stage's outputs and data/processed, so it runs in a copy of the tree
(``scripts/device_job.sh start`` makes one, with DEVICE_COMMIT: records/README.md) unless ``--in-place`` is
given. It sets params.yaml to the profile, brings preprocess up to date (``dvc repro preprocess``), then runs
``python -m cifar10_pipeline.stages.train`` twice: 'cold' after dropping the page cache (where the process
may: as root) and deleting the Triton and Inductor caches, 'warm' straight after. Each run: its exit status,
seconds from process start to exit (timed here), to the model saved and of training (its metrics/train.json).
Then a third run, 'profiled' (warm, under cProfile), gives where the main thread's time goes: its self time
summed by area (compiling, MLflow, codecarbon, imports, ...; a C function's time goes to the area of the
Python code that called it) and the largest cumulative times of our own functions. Then
``python -X importtime -c "import cifar10_pipeline.stages.train"``. Issue 18's target for this row:
process start to exit <= 20 s on a machine's first run.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import pstats
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
from cifar10_pipeline.core.provenance import DEVICE_COMMIT, tree_provenance  # noqa: E402

OUT = Path("records/cold_start.json")
RUNS = ("cold", "warm")
TARGET_SECONDS = 20.0
STAGE_MODULE = "cifar10_pipeline.stages.train"
_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def refuse_checkout(in_place: bool) -> None:
    """Stop unless this is a copy of the tree (DEVICE_COMMIT at its root) or ``--in-place`` was given."""
    if not in_place and not (Path.cwd() / DEVICE_COMMIT).is_file():
        raise SystemExit(
            "error: this rewrites params.yaml and the stage outputs here\n"
            "hint: run it in a copy (scripts/device_job.sh start, records/README.md) or pass --in-place"
        )


def set_params(profile: str, overrides: list[str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "cifar10_pipeline.core.params", f"profile={profile}", *overrides],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def preprocess(log: Path, env: dict[str, str] | None = None) -> None:
    with open(log, "a") as handle:
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "repro", "preprocess"],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if done.returncode:
        raise SystemExit(f"dvc repro preprocess failed (exit {done.returncode}); see {log}")


def timed(command: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float]:
    """(exit status, seconds from process start to exit) of ``command``, its output into ``log``."""
    shutil.rmtree("models/checkpoints", ignore_errors=True)  # each run from scratch, not resumed
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    return done.returncode, round(time.perf_counter() - start, 2)


def machine() -> dict[str, str]:
    import torch

    from cifar10_pipeline.core.device import cpu_model_name

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"gpu": gpu, "cpu": cpu_model_name(), "torch": torch.__version__}


def drop_caches() -> bool:
    """Drop the page cache and delete the Triton and Inductor caches; whether the page cache could be."""
    for folder in [Path.home() / ".triton", *map(Path, glob.glob("/tmp/torchinductor_*"))]:
        shutil.rmtree(folder, ignore_errors=True)
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def largest_imports(text: str, count: int = 10) -> list[dict]:
    """The ``count`` imports with the largest cumulative time (nested ones overlap their parents)."""
    rows = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            rows.append(
                {
                    "module": match.group(4),
                    "cumulative_seconds": int(match.group(2)) / 1e6,
                    "depth": len(match.group(3)) // 2,
                }
            )
    rows.sort(key=lambda row: -row["cumulative_seconds"])
    return [{**row, "cumulative_seconds": round(row["cumulative_seconds"], 2)} for row in rows[:count]]


# Areas of the profile, by the path of a function's file (first match wins).
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "compiling (Dynamo, Inductor, FX, Triton)",
        ("torch/_dynamo", "torch/_inductor", "torch/fx", "torch/_functorch", "/triton/"),
    ),
    ("MLflow (store, runs, artifacts)", ("/mlflow/", "/sqlalchemy/", "/alembic/")),
    ("codecarbon", ("/codecarbon/",)),
    ("transformers, huggingface_hub, safetensors", ("/transformers/", "/huggingface_hub/", "/safetensors/")),
    ("our code", ("cifar10_pipeline",)),
    ("torch (other)", ("/torch/",)),
)
OTHER_AREA = "other libraries and the standard library (numpy, scipy, pydantic, ...)"


IMPORTING = "importing modules (importlib, module top-level code)"


def area_of(filename: str, name: str) -> str:
    if name == "<module>" or filename.startswith("<frozen importlib"):
        return IMPORTING
    for area, markers in AREAS:
        if any(marker in filename for marker in markers):
            return area
    return OTHER_AREA


def profile_breakdown(profile: Path, count: int = 12) -> dict[str, Any]:
    """The main thread's self time summed by area (a built-in's time split over its callers' areas, by the
    time spent in it from each), and our own functions with the largest cumulative time."""
    stats = pstats.Stats(str(profile)).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    areas: dict[str, float] = {}
    for (filename, _, name), (_, _, tottime, _, callers) in stats.items():
        if filename != "~" or not callers:  # "~": a C function; its time is charged to its callers
            area = area_of(filename, name) if filename != "~" else OTHER_AREA
            areas[area] = areas.get(area, 0.0) + tottime
            continue
        for caller, (_, _, from_caller, _) in callers.items():
            area = area_of(caller[0], caller[2])
            areas[area] = areas.get(area, 0.0) + from_caller
    ours = sorted(
        (
            (f"{Path(f).name}:{name}", entry[3])
            for (f, _, name), entry in stats.items()
            if "cifar10_pipeline" in f
        ),
        key=lambda row: -row[1],
    )
    return {
        "main_thread_seconds_by_area": {
            k: round(v, 2) for k, v in sorted(areas.items(), key=lambda kv: -kv[1])
        },
        "our_largest_cumulative": [
            {"function": f, "cumulative_seconds": round(t, 2)} for f, t in ours[:count]
        ],
    }


def record(
    runs: dict[str, dict], importtime: str, command: str, page_cache_dropped: bool, found: dict[str, str]
) -> dict[str, Any]:
    imports = largest_imports(importtime)
    cold = runs["cold"]["process_start_to_exit_seconds"]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        **tree_provenance(PROJECT_ROOT).fields(),  # the commit read from the tree, never typed
        "what": (
            "the train stage as dvc runs it (python -m cifar10_pipeline.stages.train: MLflow on the local "
            "store and codecarbon included), twice in a row; run 'cold': the Triton and Inductor caches "
            "deleted and "
            + ("the page cache dropped" if page_cache_dropped else "the page cache NOT dropped (not root)")
            + " first; run 'warm': straight after"
        ),
        **found,
        "source": command,
        "page_cache_dropped": page_cache_dropped,
        "target": {"process_start_to_exit_seconds": TARGET_SECONDS, "met": cold <= TARGET_SECONDS},
        "runs": runs,
        "import_stage_module_seconds": next(
            (row["cumulative_seconds"] for row in imports if row["module"] == STAGE_MODULE), None
        ),
        "largest_imports": imports,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="gpu_fast")
    parser.add_argument(
        "-S", "--set", action="append", default=[], help="override, e.g. train.tta_fraction=1.0"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--logs", type=Path, default=Path("cold_start_logs"), help="each run's output")
    parser.add_argument("--in-place", action="store_true", help="run in this checkout, not a copy")
    args = parser.parse_args(argv)
    refuse_checkout(args.in_place)
    command = "python benchmarks/cold_start.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.logs.mkdir(parents=True, exist_ok=True)
    set_params(args.profile, args.set)
    preprocess(args.logs / "preprocess.log")
    runs: dict[str, dict] = {}
    dropped = False
    profile = args.logs / "stage_profiled.prof"
    for name in (*RUNS, "profiled"):
        if name == "cold":
            dropped = drop_caches()
        python = (
            [sys.executable, "-m", "cProfile", "-o", str(profile)] if name == "profiled" else [sys.executable]
        )
        status, seconds = timed([*python, "-m", STAGE_MODULE], args.logs / f"stage_{name}.log")
        train = json.loads(Path("metrics/train.json").read_text())
        runs[name] = {
            "exit_code": status,
            "process_start_to_exit_seconds": seconds,
            # psutil's process start time is whole seconds since boot: up to 1 s early
            "process_start_to_model_saved_seconds": train["stage_wall_seconds"],
            "training_seconds": train["train_seconds"],
            "device": train["device"],
        }
        if name == "profiled" and status == 0:
            runs[name].update(profile_breakdown(profile))
        print(f"{name}: exit {status} after {seconds} s", file=sys.stderr)
    importtime = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {STAGE_MODULE}"], capture_output=True, text=True
    ).stderr
    payload = record(runs, importtime, command, dropped, machine())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}: cold {runs['cold']['process_start_to_exit_seconds']} s to exit")


if __name__ == "__main__":
    main()
