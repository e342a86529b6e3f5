"""The train stage plain and under torchrun, then evaluate: records/torchrun/runs.json (docs/team.md).

    python benchmarks/torchrun.py --gpu-profile gpu_fast --cpu-profile quick

Like benchmarks/cold_start.py it rewrites params.yaml and the stage outputs, so it runs in a copy of the tree
(``scripts/device_job.sh start``, records/README.md) unless ``--in-place`` is given. On the GPU (profile
``--gpu-profile``): run 1 plain (the machine's first), run 2 plain, run 3 under ``torchrun --nproc-per-node
1``; each saved model's sha256 shows whether torchrun with one process is the plain stage. On the CPU with
CUDA hidden (profile ``--cpu-profile``): ``train.nproc`` 1 and 2 (gloo) for seeds 0-2. Every run: exit
status, seconds from process start to exit (timed here), its metrics/train.json and the evaluate stage's
test accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
from benchmarks.cold_start import machine, preprocess, refuse_checkout, set_params, timed  # noqa: E402
from cifar10_pipeline.core.provenance import tree_provenance  # noqa: E402

OUT = Path("records/torchrun/runs.json")
GPU_RUNS = ("plain1", "plain2", "torchrun1")
CPU_SEEDS = (0, 1, 2)
CPU_PROCESSES = (1, 2)
TRAIN = ["-m", "cifar10_pipeline.stages.train"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *TRAIN]


def one_run(command: list[str], log: Path, env: dict[str, str] | None) -> dict[str, Any]:
    status, seconds = timed([sys.executable, *command], log, env)
    run: dict[str, Any] = {"exit_code": status, "process_start_to_exit_seconds": seconds}
    weights = Path("models/cifar10/model.safetensors")
    run["model_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    run["train"] = json.loads(Path("metrics/train.json").read_text())
    with open(log.with_suffix(".eval.log"), "w") as handle:
        evaluate = [sys.executable, "-m", "cifar10_pipeline.stages.evaluate"]
        subprocess.run(evaluate, stdout=handle, stderr=subprocess.STDOUT, env=env, check=True)
    evaluation = json.loads(Path("metrics/eval.json").read_text())
    run["test_accuracy"] = evaluation["accuracy"]
    run["test_f1_macro"] = evaluation["f1_macro"]
    run["test_images"] = evaluation["test_images"]
    print(f"{log.stem}: exit {status} after {seconds} s, test {run['test_accuracy']}", file=sys.stderr)
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-profile", default="gpu_fast")
    parser.add_argument("--cpu-profile", default="quick")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--logs", type=Path, default=Path("torchrun_logs"), help="each run's output")
    parser.add_argument("--in-place", action="store_true", help="run in this checkout, not a copy")
    args = parser.parse_args(argv)
    refuse_checkout(args.in_place)
    command = "python benchmarks/torchrun.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.logs.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    set_params(args.gpu_profile, [])
    preprocess(args.logs / "preprocess_gpu.log")
    for name in GPU_RUNS:
        runs[f"gpu_{name}"] = one_run(
            TORCHRUN if name.startswith("torchrun") else TRAIN, args.logs / name, None
        )
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    set_params(args.cpu_profile, [])
    preprocess(args.logs / "preprocess_cpu.log", cpu_only)
    for seed in CPU_SEEDS:
        for processes in CPU_PROCESSES:
            name = f"cpu_n{processes}_s{seed}"
            set_params(args.cpu_profile, [f"train.seed={seed}", f"train.nproc={processes}"])
            runs[name] = one_run(TRAIN, args.logs / name, cpu_only)
    payload = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        **tree_provenance(PROJECT_ROOT).fields(),  # the commit read from the tree, never typed
        "what": (
            "the train stage as dvc runs it (python -m cifar10_pipeline.stages.train), then the evaluate "
            f"stage; gpu_*: profile {args.gpu_profile} on the GPU, run 1 plain (the machine's first), run 2 "
            f"plain, run 3 under torchrun --nproc-per-node 1; cpu_*: profile {args.cpu_profile} with CUDA "
            "hidden, train.nproc 1 or 2 (gloo) for seeds 0-2"
        ),
        **machine(),
        "source": command,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
