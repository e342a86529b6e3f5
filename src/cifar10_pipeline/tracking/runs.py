"""MLflow tracking shared by the stages.

One ``dvc repro`` (or one ``dvc exp run``) is one *parent* run; each stage that runs logs a *child* run under
it. The parent is named after the DVC experiment when there is one (``DVC_EXP_NAME``), else
``repro-<commit>-<params hash>``, and carries the effective params and the headline metrics, so the MLflow
compare view lines experiments up side by side.

Default store: ``sqlite:///mlflow.db`` in the project root (git-ignored), artifacts in ``mlartifacts/``.
``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cifar10_pipeline.core.params import Params
from cifar10_pipeline.core.paths import PARAMS_FILE, RAW_DIR

PARENT_ROLE = "pipeline"
KEY_TAG = "pipeline.key"
ROLE_TAG = "pipeline.role"
DEFAULT_STORE = Path("mlflow.db")
ARTIFACT_ROOT = Path("mlartifacts")


def project_root() -> Path:
    """The repository's root, also for queued experiments, which DVC runs in temporary copies
    (it sets DVC_ROOT to the real root for them), so their runs land in the project's store."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / DEFAULT_STORE}"


def git_commit(cwd: Path | None = None) -> str:
    """HEAD of the git checkout at ``cwd`` (default: the working directory); "unknown" without git or a
    checkout (e.g. a wheel in a container). Also what the web service reports in /health."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pipeline_key() -> str:
    """Identifies one pipeline run: the DVC experiment's name, or the commit plus the params file's hash."""
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return name
    params_hash = (
        hashlib.sha256(PARAMS_FILE.read_bytes()).hexdigest()[:8] if PARAMS_FILE.is_file() else "none"
    )
    return f"repro-{git_commit()[:8]}-{params_hash}"


class StageRun:
    """A stage's child run, with its parent, both written through one MlflowClient."""

    def __init__(self, client: Any, run_id: str, parent_id: str, experiment_id: str):
        self.client = client
        self.run_id = run_id
        self.parent_id = parent_id
        self.experiment_id = experiment_id

    def log_params(self, params: dict[str, Any], to_parent: bool = False) -> None:
        from mlflow.entities import Param

        entries = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for run_id in (self.run_id, self.parent_id) if to_parent else (self.run_id,):
            existing = self.client.get_run(run_id).data.params
            fresh = [p for p in entries if p.key not in existing]
            if fresh:
                self.client.log_batch(run_id, params=fresh)

    def log_metrics(
        self, metrics: dict[str, float], step: int | None = None, to_parent: bool = False
    ) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        entries = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for run_id in (self.run_id, self.parent_id) if to_parent else (self.run_id,):
            self.client.log_batch(run_id, metrics=entries)

    def set_tags(self, tags: dict[str, str], to_parent: bool = False) -> None:
        for run_id in (self.run_id, self.parent_id) if to_parent else (self.run_id,):
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)


def _experiment_id(client: Any, name: str, default_store: bool) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if default_store:  # beside the default SQLite store; a custom server decides for itself
        artifact_root = project_root() / ARTIFACT_ROOT
        artifact_root.mkdir(exist_ok=True)
        artifact_location = artifact_root.as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def _parent_run_id(client: Any, experiment_id: str, key: str, params: Params) -> str:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{key}' and tags.`{ROLE_TAG}` = '{PARENT_ROLE}'",
        max_results=1,
    )
    if runs:
        return runs[0].info.run_id
    commit = git_commit()
    tags = {
        KEY_TAG: key,
        ROLE_TAG: PARENT_ROLE,
        "mlflow.source.git.commit": commit,
        "profile": params.profile,
    }
    if (RAW_DIR / "SHA256SUMS").is_file():
        tags["data.sha256sums"] = hashlib.sha256((RAW_DIR / "SHA256SUMS").read_bytes()).hexdigest()[:16]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    run = client.create_run(experiment_id, run_name=key, tags=tags)
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, params: Params) -> Iterator[StageRun]:
    """Open the child run of ``stage`` under this pipeline run's parent; close it FAILED on an exception."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    import mlflow
    from mlflow.tracking import MlflowClient

    # Read before set_tracking_uri, which exports MLFLOW_TRACKING_URI for child processes.
    default_store = "MLFLOW_TRACKING_URI" not in os.environ
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    experiment_id = _experiment_id(client, params.mlflow.experiment, default_store)
    key = pipeline_key()
    parent_id = _parent_run_id(client, experiment_id, key, params)
    tags = {
        "mlflow.parentRunId": parent_id,
        KEY_TAG: key,
        ROLE_TAG: "stage",
        "stage": stage,
        "mlflow.source.git.commit": git_commit(),
    }
    child = client.create_run(experiment_id, run_name=stage, tags=tags)
    run = StageRun(client, child.info.run_id, parent_id, experiment_id)
    run.log_params(params.as_flat_dict(), to_parent=True)
    try:
        yield run
    except BaseException:
        client.set_terminated(run.run_id, "FAILED")
        client.set_terminated(parent_id, "FAILED")
        raise
    client.set_terminated(run.run_id, "FINISHED")
    # The parent ends with its latest stage (a later stage of the same pipeline run re-closes it).
    client.set_terminated(parent_id, "FINISHED")
