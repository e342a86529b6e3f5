"""``team_server backup`` and ``restore``, timed: two team servers in a temporary folder (free loopback
ports), the first populated through the MLflow client (runs with params, metric histories and an artifact of
a given size each, a registered version per run, ``champion``) and the DVC bucket with objects; then
``backup`` of the first and ``restore`` into the second (fresh) stack, both the real commands, and the two
compared through the MLflow client and S3 (tests/integration/team_stack.py's snapshot). Writes
``records/team_backup.json``.

    python benchmarks/team_backup.py --runs 20 --artifact-kib 1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

MODEL = "cifar10-classifier"
STEPS = 20


def populate(
    tracking_uri: str, s3: Any, dvc_bucket: str, runs: int, artifact_bytes: int, scratch: Path
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = client.create_experiment("cifar10")
    client.create_registered_model(MODEL)
    for index in range(runs):
        run_id = client.create_run(experiment, run_name=f"run-{index}").info.run_id
        client.log_param(run_id, "seed", str(index))
        for step in range(STEPS):
            client.log_metric(run_id, "train_loss", 2.0 / (step + 1) + index / 100, step=step)
        blob = scratch / "weights.bin"
        blob.write_bytes(os.urandom(artifact_bytes))
        client.log_artifact(run_id, str(blob), "model")
        client.set_terminated(run_id)
        version = client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id=run_id)
        s3.put_object(
            Bucket=dvc_bucket, Key=f"files/md5/{index:02x}/{index:030x}", Body=os.urandom(artifact_bytes)
        )
    client.set_registered_model_alias(MODEL, "champion", version.version)


def team_server(home: Path, *args: str) -> float:
    """The real command; its wall seconds."""
    started = time.monotonic()
    command = [sys.executable, "-m", "cifar10_pipeline.tracking.team_server", "--home", str(home), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--artifact-kib", type=int, default=1024, help="each run's artifact and DVC object")
    parser.add_argument("--record", type=Path, default=PROJECT_ROOT / "records" / "team_backup.json")
    args = parser.parse_args()
    from benchmarks.serving import machine_info
    from benchmarks.team_concurrency import started_server
    from cifar10_pipeline.core.io import write_json_atomic
    from cifar10_pipeline.core.provenance import tree_provenance
    from tests.integration.team_stack import logged_in, snapshot
    from tests.integration.test_team_server import Team

    provenance = tree_provenance(PROJECT_ROOT)
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="team-backup-", dir="/tmp") as scratch:
        base = Path(scratch)
        os.chmod(base, 0o755)  # as root, PostgreSQL's own user must reach its data folder
        with ThreadPoolExecutor(2) as pool:
            source_server, target_server = pool.map(started_server, (base / "source", base / "target"))
        teams = []
        for server, config in (source_server, target_server):
            raw = json.loads(server.config_file.read_text())
            uri = f"http://127.0.0.1:{config.ports['mlflow']}"
            teams.append(Team(server.home, uri, f"http://127.0.0.1:{config.ports['s3']}", raw))
        source, target = teams
        try:
            started = time.monotonic()
            with logged_in(source, "admin"):  # no editor made here: the stack's admin writes
                populate(source.tracking_uri, source.s3(), source.config["dvc_bucket"], args.runs,
                         args.artifact_kib * 1024, base)  # fmt: skip
            populate_seconds = time.monotonic() - started
            folder = base / "backup"
            backup_seconds = team_server(source.home, "backup", str(folder))
            restore_seconds = team_server(target.home, "restore", str(folder))
            manifest = json.loads((folder / "manifest.json").read_text())
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            same = snapshot(source, base / "a") == snapshot(target, base / "b")
        finally:
            for server, config in (source_server, target_server):
                server.stop(config)
    record = {
        "machine": machine_info(),
        **provenance.fields(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/team_backup.py " + " ".join(sys.argv[1:]),
        "load_average_1min_at_start": round(load_at_start, 2),
        "what": "team_server backup of a populated stack, then restore into a fresh one (MLflow restarted "
        "by restore included); the two compared through the MLflow client and S3",
        "runs": args.runs,
        "metric_steps_per_run": STEPS,
        "artifact_kib": args.artifact_kib,
        "objects": sum(len(b["objects"]) for b in manifest["buckets"].values()),
        "backup_mib": round(size / 2**20, 2),
        "populate_seconds": round(populate_seconds, 2),
        "backup_seconds": round(backup_seconds, 2),
        "restore_seconds": round(restore_seconds, 2),
        "restored_equal": same,
    }
    write_json_atomic(args.record, record)
    print(f"backup {backup_seconds:.1f} s, restore {restore_seconds:.1f} s, {record['backup_mib']} MiB, "
          f"equal: {same} -> {args.record}")  # fmt: skip
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
