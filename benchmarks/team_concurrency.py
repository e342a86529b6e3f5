"""Concurrent writers on one team server: N writers from N separate folders at once, against one MLflow
server on PostgreSQL and SeaweedFS (started here in a temporary home, free loopback ports), then checked:
every run FINISHED, every metric and artifact present, the registry's versions numbered 1..N without gaps,
``champion`` on the most accurate version, nobody stuck (a deadline on the whole). Writes
``records/team_concurrency.json``: wall time and runs per minute, with the machine, torch and commit.

Two forms of writer:

- ``pipeline``: a git clone of this commit per writer, each running a tiny ``dvc exp run`` (the quick profile
  on 1,000 images of the small mirror, 1 epoch: every stage, the evaluate stage's registration included).
- ``registration``: a folder per writer (params.yaml and .dvc/, as a clone has them) running the evaluate
  stage's tracking and registry path for real: ``stage_run`` (the stage harness: parent and child runs,
  params), a metric history, an artifact, then ``model_registry.log_and_register`` with a small saved model
  and its own test accuracy. No training: what the writers share is the server, and this is all they send it.
  tests/integration/test_team_concurrency.py runs this form.

    python benchmarks/team_concurrency.py --form pipeline --writers 8
    python benchmarks/team_concurrency.py --form registration --writers 8
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

REGISTERED_MODEL = "cifar10-classifier"  # params.yaml's mlflow.registered_model
EXPERIMENT = "cifar10"  # params.yaml's mlflow.experiment
TEST_SET = "concurrency-test-set"  # one test set for every registration writer: accuracies compare by tag
HISTORY_STEPS = 5
WRITER_LOGIN = "bench-writer"  # the editor login the benchmark makes with `users add` (one for all writers)
TINY = {
    "profile": "quick",
    "preprocess.max_train_images": "1000",
    "preprocess.val_size": "100",
    "preprocess.max_test_images": "300",
    "train.epochs": "1",
    "evaluate.robustness_images": "100",
    "download.sources": "[mirror]",
}


def writer_accuracy(index: int, writers: int) -> float:
    """Distinct accuracies in a shuffled order (not rising with the index), so the champion rule decides."""
    return round(0.5 + ((index * 5) % writers) / (writers * 10), 4)


# --- one registration writer (a separate process) --------------------------------------------------------


def registration_writer(model_dir: Path, accuracy: float) -> dict[str, Any]:
    """In its folder: the evaluate stage's tracking and registration, for real, with no model to evaluate."""
    import numpy as np

    from cifar10_pipeline.core.params import load_params
    from cifar10_pipeline.tracking import model_registry as registry
    from cifar10_pipeline.tracking.runs import stage_run

    params = load_params()

    def no_reevaluation(model_uri: str) -> float:
        raise AssertionError(f"every writer uses one test set: {model_uri} needs no re-evaluation")

    with stage_run("evaluate", params) as run:
        for step in range(HISTORY_STEPS):
            run.log_metrics({"train_loss": 2.0 / (step + 1)}, step=step)
        run.log_metrics({"test_accuracy": accuracy}, to_parent=True)
        report = Path("eval.json")
        report.write_text(json.dumps({"accuracy": accuracy}) + "\n")
        run.log_artifact(report)
        outcome = registry.log_and_register(
            run.run_id, model_dir, params.mlflow.registered_model,
            example_images=np.zeros((2, 32, 32, 3), dtype=np.uint8),
            example_probabilities=np.full((2, 10), 0.1, dtype=np.float32),
            accuracy=accuracy, test_set=TEST_SET, evaluate_champion=no_reevaluation,
        )  # fmt: skip
        run.set_tags({f"registry.{k}": str(v) for k, v in outcome.items()}, to_parent=True)
    return {"run_id": run.run_id, "parent_id": run.parent_id, **outcome}


# --- the parent: folders, processes, checks --------------------------------------------------------------


@dataclass
class Writer:
    index: int
    folder: Path
    command: list[str]
    env: dict[str, str]
    accuracy: float | None = None  # registration writers: the accuracy it registers
    process: subprocess.Popen | None = None
    seconds: float = 0.0
    returncode: int | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.folder.parent / f"writer-{self.index}.log"


def save_small_model(directory: Path) -> Path:
    """A small conv net saved the way the train stage saves one (the registered model's artifact)."""
    import torch

    from cifar10_pipeline.modeling.convnet import build_cifar_convnet

    torch.manual_seed(0)
    model = build_cifar_convnet([16, 32, 32], tta_level=0)
    model.init_whitening(torch.randn(64, 3, 32, 32))
    model.eval().save_pretrained(directory)
    return directory


def client_env(tracking_uri: str, login: dict[str, str], src: Path, name: str) -> dict[str, str]:
    """The writer's environment: the server's URI, the MLflow login (MLFLOW_TRACKING_USERNAME and
    _PASSWORD) and its own experiment name (its parent run), no S3 keys."""
    prefixes = ("DVC_", "GIT_", "MLFLOW_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(src), MLFLOW_TRACKING_URI=tracking_uri, MPLBACKEND="Agg", DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **login,
    )  # fmt: skip
    if name:
        env["DVC_EXP_NAME"] = name  # what `dvc exp run -n` sets: the parent run's name
    return env


@contextlib.contextmanager
def logged_in(login: dict[str, str]) -> Iterator[None]:
    """This process's MLflow clients log in with ``login`` (read from the environment at each request)."""
    before = {name: os.environ.get(name) for name in login}
    os.environ.update(login)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def registration_writers(tracking_uri: str, login: dict[str, str], base: Path, writers: int) -> list[Writer]:
    model_dir = save_small_model(base / "model")
    out = []
    for index in range(writers):
        folder = base / f"writer-{index}"
        (folder / ".dvc" / "tmp").mkdir(parents=True)  # the checkout's stage lock lives there
        shutil.copy(PROJECT_ROOT / "params.yaml", folder / "params.yaml")
        accuracy = writer_accuracy(index, writers)
        command = [sys.executable, str(Path(__file__).resolve()), "writer", "--model-dir", str(model_dir),
                   "--accuracy", str(accuracy)]  # fmt: skip
        env = client_env(tracking_uri, login, PROJECT_ROOT / "src", f"writer-{index}")
        out.append(Writer(index, folder, command, env, accuracy))
    return out


def pipeline_writers(
    tracking_uri: str, login: dict[str, str], base: Path, writers: int, mirror: Path
) -> list[Writer]:
    settings = [arg for key, value in TINY.items() for arg in ("-S", f"{key}={value}")]
    settings += ["-S", f"download.mirror_dir={mirror}"]
    from tests.support.mirrors import SMALL_MIRROR_PARAMS

    settings += [arg for override in SMALL_MIRROR_PARAMS for arg in ("-S", override)]
    out = []
    for index in range(writers):
        clone = base / f"clone-{index}"
        subprocess.run(["git", "clone", "--quiet", str(PROJECT_ROOT), str(clone)], check=True, timeout=120)
        command = [sys.executable, "-m", "dvc", "exp", "run", *settings, "-n", f"writer-{index}"]
        out.append(Writer(index, clone, command, client_env(tracking_uri, login, clone / "src", "")))
    return out


def run_all(writers: list[Writer], deadline_s: float) -> float:
    """Start every writer at once; wait for all within ``deadline_s`` (killing the rest). Wall seconds."""
    started = time.monotonic()
    for writer in writers:
        with open(writer.log, "wb") as log:
            writer.process = subprocess.Popen(
                writer.command, cwd=writer.folder, env=writer.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
    for writer in writers:
        assert writer.process is not None
        try:
            writer.returncode = writer.process.wait(timeout=max(1.0, started + deadline_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            writer.process.kill()
            writer.returncode = writer.process.wait()
        writer.seconds = time.monotonic() - started
    return time.monotonic() - started


def check(tracking_uri: str, writers: list[Writer], form: str) -> dict[str, Any]:
    """What the writers left on the server, read back through the MLflow client: the problems found, and
    the registry's versions and champion."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    problems = [f"writer {w.index} exited {w.returncode}: see {w.log}" for w in writers if w.returncode != 0]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=5000) if experiment else []
    parents = {r.info.run_name: r for r in runs if r.data.tags.get("pipeline.role") == "pipeline"}
    for writer in writers:
        parent = parents.get(f"writer-{writer.index}")
        if parent is None:
            problems.append(f"writer {writer.index}: no parent run")
            continue
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        evaluate = [r for r in children if r.data.tags.get("stage") == "evaluate"]
        if parent.info.status != "FINISHED" or not evaluate:
            problems.append(
                f"writer {writer.index}: parent {parent.info.status}, {len(evaluate)} evaluate run(s)"
            )
        for child in children:
            if child.info.status != "FINISHED":
                problems.append(f"writer {writer.index}: {child.data.tags.get('stage')} {child.info.status}")
        for run in evaluate:
            if "test_accuracy" not in run.data.metrics or "test_accuracy" not in parent.data.metrics:
                problems.append(f"writer {writer.index}: test_accuracy missing")
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
            if "eval.json" not in artifacts:
                problems.append(f"writer {writer.index}: eval.json missing from {sorted(artifacts)}")
            if form == "registration":
                history = client.get_metric_history(run.info.run_id, "train_loss")
                if sorted(m.step for m in history) != list(range(HISTORY_STEPS)):
                    problems.append(f"writer {writer.index}: train_loss steps {[m.step for m in history]}")
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    numbers = sorted(int(v.version) for v in versions)
    if numbers != list(range(1, len(writers) + 1)):
        problems.append(f"registry versions {numbers}, expected 1..{len(writers)} without gaps")
    by_run = {v.run_id: v for v in versions}
    evaluate_ids = {r.info.run_id for r in runs if r.data.tags.get("stage") == "evaluate"}
    if set(by_run) != evaluate_ids:
        problems.append("the registered versions are not one per evaluate run")
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion") if versions else None
    accuracies = {v.version: float(v.tags.get("test_accuracy", "nan")) for v in versions}
    best = max(accuracies.values(), default=None)
    held = getattr(champion, "version", None)
    if champion is None or accuracies.get(held) != best:
        problems.append(f"champion is v{held} ({accuracies.get(held)}), the best scored {best}: {accuracies}")
    return {
        "problems": problems,
        "runs": len(runs),
        "versions": numbers,
        "champion_version": getattr(champion, "version", None),
        "accuracies": accuracies,
    }


def concurrent_writers(
    tracking_uri: str,
    login: dict[str, str],
    base: Path,
    writers: int,
    form: str,
    deadline_s: float,
    mirror: Path | None = None,
) -> dict[str, Any]:
    """Prepare, run and check ``writers`` writers of ``form`` against the server at ``tracking_uri``, all
    with the MLflow ``login`` (an editor's MLFLOW_TRACKING_USERNAME and _PASSWORD)."""
    base.mkdir(parents=True, exist_ok=True)
    if form == "registration":
        prepared = registration_writers(tracking_uri, login, base, writers)
    else:
        assert mirror is not None, "the pipeline form needs the small mirror"
        prepared = pipeline_writers(tracking_uri, login, base, writers, mirror)
    wall = run_all(prepared, deadline_s)
    with logged_in(login):
        result = check(tracking_uri, prepared, form)
    result.update(
        wall_seconds=round(wall, 2),
        runs_per_minute=round(writers * 60 / wall, 2),
        writer_seconds=[round(w.seconds, 2) for w in prepared],
        logs=[str(w.log) for w in prepared],
    )
    return result


def started_server(home: Path):
    """A team server in ``home`` on free loopback ports (the package's own supervisor)."""
    from cifar10_pipeline.tracking.team_server import DEFAULT_PORTS, Config, TeamServer
    from tests.support.localserver import free_port

    server = TeamServer(home)
    config = Config(ports={name: free_port() for name in DEFAULT_PORTS})
    server.start(config)
    return server, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("writer", help="(internal) one registration writer, in its folder")
    one.add_argument("--model-dir", type=Path, required=True)
    one.add_argument("--accuracy", type=float, required=True)
    parser.add_argument("--form", choices=("pipeline", "registration"), default="pipeline")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=3600.0, help="seconds for all writers together")
    parser.add_argument("--mirror", type=Path, default=PROJECT_ROOT.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--record", type=Path, default=PROJECT_ROOT / "records" / "team_concurrency.json")
    args = parser.parse_args(argv)
    if args.command == "writer":
        print(json.dumps(registration_writer(args.model_dir, args.accuracy)))
        return 0

    from benchmarks.serving import machine_info
    from cifar10_pipeline.core.io import write_json_atomic
    from cifar10_pipeline.core.provenance import tree_provenance

    provenance = tree_provenance(PROJECT_ROOT)
    load_at_start = os.getloadavg()[0]  # the machine may be shared: how busy it was when this started
    with tempfile.TemporaryDirectory(prefix="team-concurrency-", dir="/tmp") as scratch:
        base = Path(scratch)
        os.chmod(base, 0o755)  # as root, PostgreSQL's own user must reach its data folder
        mirror = None
        if args.form == "pipeline":
            from tests.support.mirrors import write_small_mirror

            mirror = write_small_mirror(args.mirror, base / "small-mirror")
        server, config = started_server(base / "home")
        try:
            server.add_user(config, WRITER_LOGIN, "editor")
            login = {"MLFLOW_TRACKING_USERNAME": WRITER_LOGIN,
                     "MLFLOW_TRACKING_PASSWORD": server.password_of(WRITER_LOGIN)}  # fmt: skip
            result = concurrent_writers(config.tracking_uri, login, base / "writers", args.writers,
                                        args.form, args.deadline, mirror)  # fmt: skip
        finally:
            server.stop(config)
    entry = {
        "machine": machine_info(),
        **provenance.fields(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/team_concurrency.py " + " ".join(sys.argv[1:]),
        "writers": args.writers,
        "load_average_1min_at_start": round(load_at_start, 2),
        "what": f"{args.writers} writers started at once against one team server (MLflow on PostgreSQL, "
        "SeaweedFS), each from its own folder; wall time from the first start to the last exit",
        "wall_seconds": result["wall_seconds"],
        "runs_per_minute": result["runs_per_minute"],
        "writer_seconds": result["writer_seconds"],
        "mlflow_runs": result["runs"],
        "registry_versions": result["versions"],
        "champion_version": result["champion_version"],
        "problems": result["problems"],
    }
    # One entry per form, each with its own machine and commit: a run of one form keeps the other's.
    record = json.loads(args.record.read_text()) if args.record.is_file() else {"forms": {}}
    record["forms"][args.form] = entry
    write_json_atomic(args.record, record)
    print(f"{args.writers} {args.form} writers: {result['wall_seconds']:.1f} s, "
          f"{result['runs_per_minute']:.2f} runs/min; problems: {result['problems'] or 'none'}")  # fmt: skip
    print(f"-> {args.record}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
