"""A newcomer's fastest path to a first prediction, timed: a fresh clone of this commit beside the data
mirror, the quick profile (``dvc exp run -S profile=quick``: the whole pipeline on a 5,000-image subset), then
``cifar10 predict`` on one test image. The venv is the warm one this script runs in (``make setup`` is not
timed: it is a download). Writes ``records/quick_start.json``; the README's quick start and the no-model
message quote it.

    python benchmarks/quick_start.py                       # mirror at ../shared/data/cifar10
    python benchmarks/quick_start.py --mirror /data/cifar10
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
from benchmarks.serving import machine_info  # noqa: E402

QUICK_COMMAND = ["dvc", "exp", "run", "-S", "profile=quick"]


def first_test_image(mirror: Path, destination: Path) -> Path:
    """The mirror's first test image, as the PNG file a user would have."""
    import pyarrow.parquet as pq
    from PIL import Image

    (shard,) = sorted(mirror.glob("test-*.parquet"))
    row = pq.read_table(shard, columns=["img"]).slice(0, 1).to_pylist()[0]["img"]
    Image.open(io.BytesIO(row["bytes"])).save(destination)
    return destination


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def measure(mirror: Path) -> dict[str, Any]:
    from cifar10_pipeline.core.provenance import tree_provenance

    provenance = tree_provenance(PROJECT_ROOT)
    with tempfile.TemporaryDirectory(prefix="quick-start-") as scratch:
        base = Path(scratch)
        (base / "shared" / "data").mkdir(parents=True)
        (base / "shared" / "data" / "cifar10").symlink_to(mirror.resolve(), target_is_directory=True)
        clone = base / "cifar10-pipeline"
        subprocess.run(["git", "clone", "-q", str(PROJECT_ROOT), str(clone)], check=True)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        quick_seconds, _ = timed(QUICK_COMMAND, clone, env)
        image = first_test_image(mirror, base / "airplane-or-not.png")
        predict_seconds, _ = timed(["cifar10", "predict", "--json", str(image)], clone, env)
        evaluation = json.loads((clone / "metrics" / "eval.json").read_text())
        train = json.loads((clone / "metrics" / "train.json").read_text())
        shutil.rmtree(clone / ".dvc" / "cache", ignore_errors=True)
    return {
        "machine": machine_info(),
        **provenance.fields(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/quick_start.py " + " ".join(sys.argv[1:]),
        "what": "a fresh git clone beside the mirror, the warm venv; the quick profile, then one prediction",
        "steps": [
            {"command": " ".join(QUICK_COMMAND), "seconds": round(quick_seconds, 1)},
            {"command": "cifar10 predict --json <a test image>", "seconds": round(predict_seconds, 1)},
        ],
        "total_seconds": round(quick_seconds + predict_seconds, 1),
        "quick_profile": {
            "test_accuracy": evaluation["accuracy"],
            "test_images": evaluation["test_images"],
            "train_images": train["train_images"],
            "train_seconds": train["train_seconds"],
            "device": train["device"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mirror", type=Path, default=PROJECT_ROOT.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--record", type=Path, default=PROJECT_ROOT / "records" / "quick_start.json")
    args = parser.parse_args()
    from cifar10_pipeline.core.io import write_json_atomic

    record = measure(args.mirror)
    write_json_atomic(args.record, record)
    for step in record["steps"]:
        print(f"{step['seconds']:7.1f} s  {step['command']}")
    accuracy = record["quick_profile"]["test_accuracy"]
    print(f"{record['total_seconds']:7.1f} s  in all; the quick model's test accuracy {accuracy}")
    print(f"-> {args.record}")


if __name__ == "__main__":
    main()
