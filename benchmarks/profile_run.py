"""One profile through every stage, kept as a record: ``dvc exp run -S profile=NAME [-S ...]``, then the
run's metrics (train, eval, emissions) copied to ``records/<profile>/`` with ``run.json``: the command, the
machine, torch, the wall time and the commit of the tree it ran in (core/provenance.py).

    python benchmarks/profile_run.py parent_vit -S train.model=/tmp/vit-in21k-random

For a profile that is not the default's (whose figures are metrics/ itself, written by ``dvc repro``). It
rewrites params.yaml and the stages' outputs (an experiment applied to the workspace), so it runs in a copy
of the tree (``scripts/device_job.sh start`` makes one) unless ``--in-place`` is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
from cifar10_pipeline.core.device import cpu_model_name  # noqa: E402
from cifar10_pipeline.core.provenance import DEVICE_COMMIT, tree_provenance  # noqa: E402

KEPT = ("train.json", "eval.json", "emissions.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile")
    parser.add_argument("-S", "--set", action="append", default=[], help="override, e.g. train.model=DIR")
    parser.add_argument("--in-place", action="store_true", help="run in this checkout (rewrites params.yaml)")
    args = parser.parse_args(argv)
    if not args.in_place and not (Path.cwd() / DEVICE_COMMIT).is_file():
        parser.error("this rewrites params.yaml and the stage outputs: run it in a copy or pass --in-place")
    command = ["dvc", "exp", "run", "-S", f"profile={args.profile}"]
    for override in args.set:
        command += ["-S", override]
    provenance = tree_provenance(Path.cwd()).fields()  # before the run changes the tree
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", *command], check=True)
    seconds = time.perf_counter() - started
    import torch

    out = Path("records") / args.profile
    out.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        shutil.copy2(Path("metrics") / name, out / name)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    record = {
        "what": f"the {args.profile} profile through every stage",
        "command": " ".join(command),
        "rewritten_by": "python benchmarks/profile_run.py " + " ".join(argv or sys.argv[1:]),
        "wall_seconds": round(seconds, 1),
        "machine": {"cpu": cpu_model_name(), "gpu": gpu},
        "torch": torch.__version__,
        **provenance,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}/: {', '.join(KEPT)}, run.json ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
