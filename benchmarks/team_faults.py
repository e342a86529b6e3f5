"""The team server's faults, timed: runs tests/integration/test_team_faults.py and its release form
tests/release/test_team_faults_s3.py (a real stack each; the MLflow server, PostgreSQL and the S3 gateway
each killed with SIGKILL while a real stage runs) and records how long
the stage waited on the dead server before it went on with the local store, against the bound the stage
harness states (tracking/runs.py: OUTAGE_BOUND_S, from MLflow's own HTTP settings), and the module's wall
time.

    python benchmarks/team_faults.py                   # -> records/team_faults.json

The record names the machine, torch and the commit; the figures are of whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "src"))
from benchmarks.serving import machine_info  # noqa: E402

TEST_MODULES = ("tests/integration/test_team_faults.py", "tests/release/test_team_faults_s3.py")
# printed by test_team_faults.check_offline_then_synced, one line per fault (after pytest's progress dots)
FAULT_LINE = re.compile(
    r"(fault-[\w-]+): gave up on the server after ([\d.]+) s; stage exit ([\d.]+) s after"
)
FAULTS = 3  # the MLflow server, PostgreSQL, the S3 gateway


def measure() -> dict[str, Any]:
    from cifar10_pipeline.core.provenance import tree_provenance
    from cifar10_pipeline.tracking.runs import HTTP_ENV, OUTAGE_BOUND_S

    command = [
        sys.executable,
        "-m",
        "pytest",
        *TEST_MODULES,
        "-q",
        "-s",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
    ]
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1800, check=False
    )
    wall = time.monotonic() - started
    passed = re.search(r"(\d+) passed", done.stdout)
    if done.returncode != 0 or passed is None:
        raise SystemExit(
            f"the fault tests failed ({done.returncode}):\n{done.stdout[-6000:]}{done.stderr[-2000:]}"
        )
    found = FAULT_LINE.findall(done.stdout)
    if len(found) != FAULTS:
        raise SystemExit(
            f"expected {FAULTS} fault lines in the tests' output, found {found}:\n{done.stdout[-6000:]}"
        )
    faults = [
        {
            "fault": name,
            "gave_up_seconds": float(gave_up),
            "stage_exit_after_resume_seconds": float(exit_after),
        }
        for name, gave_up, exit_after in found
    ]
    return {
        "machine": machine_info(),
        **tree_provenance(PROJECT_ROOT).fields(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/team_faults.py " + " ".join(sys.argv[1:]),
        "outage_bound_seconds": OUTAGE_BOUND_S,
        "mlflow_http_settings": HTTP_ENV,
        "faults": faults,
        "tests_passed": int(passed.group(1)),
        "module_wall_seconds": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--record", type=Path, default=PROJECT_ROOT / "records" / "team_faults.json")
    args = parser.parse_args()
    from cifar10_pipeline.core.io import write_json_atomic

    record = measure()
    write_json_atomic(args.record, record)
    bound = record["outage_bound_seconds"]
    for row in record["faults"]:
        print(f"{row['fault']}: gave up after {row['gave_up_seconds']:.1f} s (bound {bound} s)")
    print(f"{record['tests_passed']} tests in {record['module_wall_seconds']:.0f} s -> {args.record}")


if __name__ == "__main__":
    main()
