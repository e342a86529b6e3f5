"""How fast each stage starts: the wall time of ``python -m cifar10_pipeline.stages.<stage> --help`` (the
interpreter's start, the stage module's imports, the argument parsing that precedes ``main()``; a stage's
first work is the first line of its ``main()``) and, from ``python -X importtime``, what its imports cost by
package.

    python benchmarks/stage_start.py                  # every stage of dvc.yaml, 5 runs each
    python benchmarks/stage_start.py --runs 9 --record records/stage_start.json

Run it on an otherwise idle machine: the record names the CPU, its vector unit, torch and the commit.
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
from benchmarks.serving import machine_info  # noqa: E402

TARGET_SECONDS = 3.0  # issue 26: a stage's start to its first work
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def stages(dvc_yaml: Path) -> list[str]:
    """The stages of dvc.yaml whose command is ``python -m cifar10_pipeline.stages.<name>``, in order."""
    found = []
    for spec in yaml.safe_load(dvc_yaml.read_text())["stages"].values():
        match = re.match(r"python -m cifar10_pipeline\.stages\.(\w+)", str(spec.get("cmd", "")))
        if match:
            found.append(match.group(1))
    return found


def start_seconds(stage: str) -> float:
    """Wall time of one ``--help`` of the stage, process start to exit."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", f"cifar10_pipeline.stages.{stage}", "--help"],
        check=True,
        capture_output=True,
        cwd=PROJECT_ROOT,
    )
    return time.perf_counter() - started


def imports_by_package(stage: str, top: int = 6) -> list[dict[str, Any]]:
    """Seconds of import per top-level package (the outermost imports, cumulative), largest first."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", f"cifar10_pipeline.stages.{stage}", "--help"],
        check=True,
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
    )
    by_package: dict[str, float] = defaultdict(float)
    for line in result.stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if match and len(match.group(3)) == 1:  # an import at the outermost level: its cumulative time
            by_package[match.group(4).split(".")[0]] += int(match.group(2)) / 1e6
    ranked = sorted(by_package.items(), key=lambda kv: -kv[1])
    return [{"package": name, "seconds": round(seconds, 3)} for name, seconds in ranked[:top]]


def measure(runs: int) -> dict[str, Any]:
    from cifar10_pipeline.core.provenance import tree_provenance

    results = []
    for stage in stages(PROJECT_ROOT / "dvc.yaml"):
        start_seconds(stage)  # warm the page cache: the figures are of a warm machine
        walls = [start_seconds(stage) for _ in range(runs)]
        results.append(
            {
                "stage": stage,
                "help_seconds_median": round(statistics.median(walls), 3),
                "help_seconds_min": round(min(walls), 3),
                "help_seconds_max": round(max(walls), 3),
                "imports_by_package_seconds": imports_by_package(stage),
                "within_target": statistics.median(walls) <= TARGET_SECONDS,
            }
        )
    return {
        "machine": machine_info(),
        **tree_provenance(PROJECT_ROOT).fields(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/stage_start.py " + " ".join(sys.argv[1:]),
        "runs": runs,
        "target_seconds": TARGET_SECONDS,
        "stages": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--record", type=Path, default=PROJECT_ROOT / "records" / "stage_start.json")
    args = parser.parse_args()
    from cifar10_pipeline.core.io import write_json_atomic

    record = measure(args.runs)
    write_json_atomic(args.record, record)
    for row in record["stages"]:
        top = ", ".join(f"{i['package']} {i['seconds']:.2f}" for i in row["imports_by_package_seconds"])
        print(f"{row['stage']:11s} --help {row['help_seconds_median']:.2f} s (imports: {top})")
    print(f"-> {args.record}")


if __name__ == "__main__":
    main()
