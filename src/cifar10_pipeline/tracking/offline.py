"""Copy the runs stages logged offline (server unreachable, ``tracking.required: false``) to the server.

    python -m cifar10_pipeline.tracking.offline --to http://mlflow.example:5000
    python -m cifar10_pipeline.tracking.offline --to URI --from sqlite:///path/to/mlflow.db

Such runs live in the project's local store (``sqlite:///mlflow.db``) with the tag ``pipeline.offline_for``
(the server that did not answer). Each one not yet copied is recreated on the target with its name, tags,
params, full metric histories, artifacts, status and times, children under their (copied or already
present) pipeline parent; the local run is then tagged ``pipeline.synced_to`` with the new run's id, so
running the command again copies nothing twice. A local run that continues a server run the server stopped
answering for mid-stage (tag ``pipeline.resumes``) is written into that server run instead (its params,
metrics, tags and artifacts added, its status and end time set), so the server keeps one complete run per
stage and none is left RUNNING. Model registry entries are not copied (a registered
version points at an artifact of the local store): with the server up, ``dvc repro -f evaluate`` registers
the model there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from cifar10_pipeline.tracking.runs import (
    KEY_TAG,
    OFFLINE_TAG,
    PARENT_ROLE,
    RESUMES_TAG,
    ROLE_TAG,
    local_store_uri,
)

SYNCED_TAG = "pipeline.synced_to"
PARENT_TAG = "mlflow.parentRunId"
BATCH = 1000  # MLflow's log_batch limit on metrics per call


def _target_experiment(target: Any, name: str) -> str:
    experiment = target.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else target.create_experiment(name)


def _resumed(target: Any, run: Any) -> str | None:
    """The server run ``run`` continues (``RESUMES_TAG``), if the target holds it."""
    from mlflow.exceptions import MlflowException

    resumed = run.data.tags.get(RESUMES_TAG)
    if resumed is None:
        return None
    try:
        return target.get_run(resumed).info.run_id
    except MlflowException:
        return None


def _copy_run(source: Any, target: Any, run: Any, experiment_id: str, parent_id: str | None) -> str:
    from mlflow.entities import Metric, Param, RunTag

    tags = {k: v for k, v in run.data.tags.items() if k != PARENT_TAG}
    tags["pipeline.synced_from"] = run.info.run_id
    if parent_id is not None:
        tags[PARENT_TAG] = parent_id
    new_id = _resumed(target, run)
    if new_id is None:
        copy = target.create_run(
            experiment_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name
        )
        new_id = copy.info.run_id
        existing_params: dict[str, str] = {}
    else:  # the server's own run: add what it lacks (the params it has are the same values)
        tags.pop(PARENT_TAG, None)
        target.log_batch(new_id, tags=[RunTag(k, v) for k, v in tags.items()])
        existing_params = target.get_run(new_id).data.params
    params = [Param(k, v) for k, v in run.data.params.items() if k not in existing_params]
    for start in range(0, len(params), 100):
        target.log_batch(new_id, params=params[start : start + 100])
    metrics = [
        Metric(m.key, m.value, m.timestamp, m.step)
        for key in run.data.metrics
        for m in source.get_metric_history(run.info.run_id, key)
    ]
    for start in range(0, len(metrics), BATCH):
        target.log_batch(new_id, metrics=metrics[start : start + BATCH])
    with tempfile.TemporaryDirectory() as scratch:
        if source.list_artifacts(run.info.run_id):
            local = source.download_artifacts(run.info.run_id, "", scratch)
            target.log_artifacts(new_id, local)
    target.set_terminated(new_id, run.info.status, end_time=run.info.end_time)
    source.set_tag(run.info.run_id, SYNCED_TAG, new_id)
    return new_id


def sync(target_uri: str, source_uri: str | None = None) -> list[tuple[str, str]]:
    """Copy every offline run of ``source_uri`` (default: the local store) not yet copied to ``target_uri``;
    returns (local run id, new run id) pairs, parents first."""
    from mlflow.tracking import MlflowClient

    source_uri = source_uri or local_store_uri()
    source = MlflowClient(tracking_uri=source_uri, registry_uri=source_uri)
    target = MlflowClient(tracking_uri=target_uri, registry_uri=target_uri)
    copied: list[tuple[str, str]] = []
    for experiment in source.search_experiments():
        runs = [
            run
            for run in source.search_runs([experiment.experiment_id], max_results=50000)
            if OFFLINE_TAG in run.data.tags and SYNCED_TAG not in run.data.tags
        ]
        if not runs:
            continue
        experiment_id = _target_experiment(target, experiment.name)
        # Parents first, so the children can point at the copies.
        runs.sort(key=lambda run: run.data.tags.get(ROLE_TAG) != PARENT_ROLE)
        parents: dict[str, str] = {}
        for run in runs:
            parent_id = None
            old_parent = run.data.tags.get(PARENT_TAG)
            if old_parent is not None:
                parent_id = parents.get(old_parent) or _existing_parent(
                    source, target, old_parent, experiment_id
                )
            new_id = _copy_run(source, target, run, experiment_id, parent_id)
            if run.data.tags.get(ROLE_TAG) == PARENT_ROLE:
                parents[run.info.run_id] = new_id
            copied.append((run.info.run_id, new_id))
    return copied


def _existing_parent(source: Any, target: Any, old_parent: str, experiment_id: str) -> str | None:
    """The target's copy of a parent synced earlier, or its own parent of the same pipeline run."""
    parent = source.get_run(old_parent)
    if SYNCED_TAG in parent.data.tags:
        return parent.data.tags[SYNCED_TAG]
    key = parent.data.tags.get(KEY_TAG)
    if key is None:
        return None
    found = target.search_runs(
        [experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{key}' and tags.`{ROLE_TAG}` = '{PARENT_ROLE}'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar10_pipeline.tracking.offline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--to", required=True, help="the tracking server (or store) to copy the runs to")
    parser.add_argument("--from", dest="source", help="the local store (default: sqlite:///mlflow.db here)")
    args = parser.parse_args(argv)
    from cifar10_pipeline.tracking.runs import unreachable_reason

    reason = unreachable_reason(args.to)
    if reason is not None:
        print(f"{args.to} does not answer ({reason}): start it, then run this command again", file=sys.stderr)
        return 1
    source = args.source or local_store_uri()
    if source.startswith("sqlite:///") and not Path(source.removeprefix("sqlite:///")).is_file():
        print(f"no local store at {source}: nothing was logged offline here", file=sys.stderr)
        return 1
    copied = sync(args.to, source)
    for old, new in copied:
        print(f"copied run {old} -> {new}")
    print(f"{len(copied)} run(s) copied from {source} to {args.to}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
