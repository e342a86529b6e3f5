"""metrics/torchrun/runs.json from the results folder of scripts/device_torchrun_check.sh (ddpres/).

    python scripts/torchrun_record.py /path/to/ddpres [--date 2026-12-01]

The folder holds, per run, the train stage's metrics/train.json (<run>.train.json) and the evaluate stage's
metrics/eval.json (<run>.eval.json), plus times.txt (exit status and seconds from start to exit), sha.txt
(sha256 of each saved model.safetensors) and gpu.txt (GPU, CPU, torch). docs/team.md renders the record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path("metrics/torchrun/runs.json")
# The runs the device job makes (its loop names them the same way).
GPU_RUNS = ("plain1", "plain2", "torchrun1")
CPU_RUNS = tuple(f"cpu_n{processes}_s{seed}" for seed in range(3) for processes in (1, 2))
WHAT = (
    "the train stage as dvc runs it (python -m cifar10_pipeline.stages.train), then the evaluate stage, on "
    "the device machine; gpu_*: profile gpu_fast on the GPU, run 1 plain with cold caches, run 2 plain, "
    "run 3 under torchrun --nproc-per-node 1; cpu_*: profile quick with CUDA hidden, train.nproc 1 or 2 "
    "(gloo) for seeds 0-2"
)


def record(results: Path, date: str) -> dict:
    runs: dict[str, dict] = {}
    for line in (results / "times.txt").read_text().splitlines():
        name, status, seconds = line.split()
        if name not in GPU_RUNS + CPU_RUNS:
            raise SystemExit(f"{results / 'times.txt'}: unknown run {name!r}; expected {GPU_RUNS + CPU_RUNS}")
        runs[name] = {
            "exit_code": int(status.split("=")[1]),
            "process_start_to_exit_seconds": round(float(seconds.split("=")[1]), 2),
        }
    for line in (results / "sha.txt").read_text().splitlines():
        name, digest, _ = line.split()
        runs[name]["model_sha256"] = digest
    for name, run in runs.items():
        evaluation = json.loads((results / f"{name}.eval.json").read_text())
        run["train"] = json.loads((results / f"{name}.train.json").read_text())
        run["test_accuracy"] = evaluation["accuracy"]
        run["test_f1_macro"] = evaluation["f1_macro"]
        run["test_images"] = evaluation["test_images"]
    machine = (results / "gpu.txt").read_text().splitlines()  # csv header, GPU row, CPU line, torch line
    return {
        "date": date,
        "what": WHAT,
        "gpu": machine[1].split(",")[0].strip(),
        "cpu": machine[2].split(":", 1)[1].strip(),
        "torch": machine[3].split()[1],
        "source": "scripts/device_torchrun_check.sh (device job); each run's stage outputs in runs.*.train",
        "runs": {(name if name in CPU_RUNS else f"gpu_{name}"): run for name, run in runs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--date", required=True)
    args = parser.parse_args()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record(args.results, args.date), indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
