"""MLflow tracking shared by the stages.

One ``dvc repro`` (or one ``dvc exp run``) is one *parent* run; each stage that runs logs a *child* run under
it. The parent is named after the DVC experiment when there is one (``DVC_EXP_NAME``), else
``repro-<commit>-<params hash>``, and carries the effective params and the headline metrics, so the MLflow
compare view lines experiments up side by side.

``stage_run`` is the harness every stage runs in: it takes the checkout's stage lock (one stage at a time,
also for stages started with ``python -m``), checks that the tracking server answers before any compute,
opens the stage's run, closes it FINISHED, FAILED or KILLED (never left RUNNING) and deletes the stage's
outputs when the stage fails.

Default store: ``sqlite:///mlflow.db`` in the project root (git-ignored), artifacts in ``mlartifacts/``.
``MLFLOW_TRACKING_URI`` overrides it. A server there that does not answer stops the stage with a message
naming the URI, unless params.yaml says ``tracking.required: false``: then the stage logs to the default
store, tags its runs ``pipeline.offline_for`` and says how to copy them to the server later
(``python -m cifar10_pipeline.tracking.offline --to URI``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cifar10_pipeline.core.data import remove_outputs
from cifar10_pipeline.core.errors import PipelineError
from cifar10_pipeline.core.params import Params
from cifar10_pipeline.core.paths import PARAMS_FILE, RAW_DIR
from cifar10_pipeline.core.provenance import head_commit

PARENT_ROLE = "pipeline"
KEY_TAG = "pipeline.key"
ROLE_TAG = "pipeline.role"
OFFLINE_TAG = "pipeline.offline_for"  # runs logged to the local store while this server did not answer
# Who runs a stage's run: a run still RUNNING whose process is gone (SIGKILL, a power cut) is closed KILLED
# by the next stage that opens a run in the same process space (machine, boot and PID namespace).
HOST_TAG = "pipeline.host"
PID_TAG = "pipeline.pid"
DEFAULT_STORE = Path("mlflow.db")
ARTIFACT_ROOT = Path("mlartifacts")


def project_root() -> Path:
    """The repository's root, also for queued experiments, which DVC runs in temporary copies
    (it sets DVC_ROOT to the real root for them), so their runs land in the project's store."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def local_store_uri() -> str:
    return f"sqlite:///{project_root() / DEFAULT_STORE}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri()


PROBE_TIMEOUT_S = 5.0


def unreachable_reason(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the tracking server at ``uri`` cannot be reached (refused, timed out, unknown host), or None when
    something listens there or the URI is a local store (sqlite:, file:, a path). One TCP connection, no
    retries: MLflow's own client retries an unreachable server for minutes before it gives up."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return f"the URI is malformed ({exc})"
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:.0f} s"
    except OSError as exc:
        return exc.strerror or str(exc)


class TrackingUnreachable(SystemExit):
    """The MLflow tracking server does not answer and params.yaml's ``tracking.required`` is true."""


def _unreachable_message(stage: str, uri: str, reason: str) -> str:
    return (
        f"{stage}: the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) does not answer: {reason}.\n"
        "Nothing was computed. Start the server (the team server: python -m "
        "cifar10_pipeline.tracking.team_server start), point MLFLOW_TRACKING_URI at one that runs, or unset "
        "it to track in the local store (sqlite:///mlflow.db); or run without the server with "
        "`-S tracking.required=false` (dvc exp run) or tracking.required: false in conf/config.yaml, "
        "and copy the runs to it later with python -m cifar10_pipeline.tracking.offline --to URI."
    )


USERNAME_VAR, PASSWORD_VAR = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
LOGIN_HINT = (
    f"export {USERNAME_VAR} and {PASSWORD_VAR} with your login on that server (on the team server, its "
    "operator makes one with `python -m cifar10_pipeline.tracking.team_server users add NAME --role "
    "editor` and prints it with `... team_server env --user NAME`)"
)


class TrackingLoginRefused(PipelineError):
    """The tracking server answers 401: the MLflow login (MLFLOW_TRACKING_USERNAME/PASSWORD) is missing
    or wrong. Never a reason to fall back to the local store: the server is up, the login is the fault."""


def login_refused(stage: str, uri: str, timeout: float = PROBE_TIMEOUT_S) -> TrackingLoginRefused | None:
    """The error to stop ``stage`` with when the server at ``uri`` refuses this process's MLflow login
    (401), else None (a local store, a server without authentication, or a login it accepts). One request
    with the credentials the MLflow client would send, no retries: the client itself would first run the
    stage's setup and then fail on its first call."""
    import base64
    import urllib.error
    import urllib.request

    if urlsplit(uri).scheme not in ("http", "https"):
        return None
    username, password = os.environ.get(USERNAME_VAR), os.environ.get(PASSWORD_VAR)
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    headers = {}
    if username and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    elif token:
        headers["Authorization"] = f"Bearer {token}"
    probe = urllib.request.Request(
        f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers
    )
    try:
        with urllib.request.urlopen(probe, timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        if exc.code != 401:
            return None  # any other answer is for the MLflow client to report
    except (urllib.error.URLError, OSError, ValueError):
        return None  # reachability is unreachable_reason's business
    where = f"{stage}: the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) asks for a login"
    if not username:
        problem = f"{USERNAME_VAR} is not set"
    elif not password:
        problem = f"{PASSWORD_VAR} is not set (for {USERNAME_VAR}={username})"
    else:
        problem = (
            f"it refused {USERNAME_VAR}={username} with this {PASSWORD_VAR} (401): a wrong password "
            "or no such user"
        )
    return TrackingLoginRefused(f"{where}: {problem}. Nothing was computed.", LOGIN_HINT)


def offline_hint(uri: str) -> str:
    return f"python -m cifar10_pipeline.tracking.offline --to {uri}"


STAGE_LOCK = Path(".dvc") / "tmp" / "cifar10-stage.lock"


class StageLocked(SystemExit):
    """Another stage holds this checkout's stage lock."""


@contextlib.contextmanager
def stage_lock(stage: str, lock_file: Path = STAGE_LOCK) -> Iterator[None]:
    """Hold the checkout's stage lock for the block, or stop at once if another stage holds it.

    ``dvc repro`` holds DVC's own lock, so two of them never run at once; a stage started with
    ``python -m`` does not take DVC's lock, and two stages writing the same outputs (or one deleting the
    other's outputs when it fails) would corrupt them. The lock is an flock on ``.dvc/tmp/`` (git-ignored),
    which the kernel releases when its holder dies, even by SIGKILL, so no stale lock can block a later
    run. Outside a DVC project (no ``.dvc/`` in the working directory) there is nothing to lock."""
    import fcntl

    lock_file = Path(lock_file)
    if not lock_file.parent.parent.is_dir():
        yield
        return
    lock_file.parent.mkdir(exist_ok=True)
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another stage"
            raise StageLocked(
                f"{stage}: {holder} is running in this checkout ({lock_file.resolve()} is locked). "
                "Wait for it to finish: stages of one checkout write the same outputs, so they run one "
                "at a time. (A second `dvc repro` is refused by DVC's own lock.)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"stage {stage} (pid {os.getpid()})\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)


def pipeline_key() -> str:
    """Identifies one pipeline run: the DVC experiment's name, or the commit plus the params file's hash."""
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return name
    params_hash = (
        hashlib.sha256(PARAMS_FILE.read_bytes()).hexdigest()[:8] if PARAMS_FILE.is_file() else "none"
    )
    return f"repro-{head_commit()[:8]}-{params_hash}"


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


def _parent_run_id(
    client: Any, experiment_id: str, key: str, params: Params, offline_for: str | None = None
) -> str:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{key}' and tags.`{ROLE_TAG}` = '{PARENT_ROLE}'",
        max_results=1,
    )
    if runs:
        return runs[0].info.run_id
    commit = head_commit()
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
    if offline_for:
        tags[OFFLINE_TAG] = offline_for
    run = client.create_run(experiment_id, run_name=key, tags=tags)
    return run.info.run_id


class StageTerminated(SystemExit):
    """SIGTERM arrived while a stage ran (a killed queued experiment, ``docker stop``, a CI timeout)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)  # the exit status a shell reports for a SIGTERM death


def run_status(error: BaseException | None) -> str:
    """How a stage's run ends: FINISHED, KILLED when it was interrupted or terminated, else FAILED."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, KeyboardInterrupt | StageTerminated) else "FAILED"


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into StageTerminated inside the block. Python's default ends the process on the spot,
    which would leave the run RUNNING forever; raising lets ``stage_run`` close it KILLED first."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers; such callers keep their own
        return

    def terminate(signum: int, frame: object) -> None:
        raise StageTerminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _terminate(client: Any, run_ids: Sequence[str], status: str, error: BaseException | None) -> None:
    """Close the runs with ``status``. While a stage is failing, a store that cannot be written to is
    reported as a warning, so the stage's own error is the one the user sees."""
    for run_id in run_ids:
        try:
            client.set_terminated(run_id, status)
        except Exception as exc:
            if error is None:
                raise
            logging.getLogger(__name__).warning("could not mark MLflow run %s %s: %s", run_id, status, exc)


def process_space() -> str:
    """Where this process's id means something: the host name, the kernel's boot id and the PID
    namespace, so that two containers (or two boots) of one machine are never mistaken for each other."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


def _close_dead_runs(client: Any, experiment_id: str) -> list[str]:
    """Mark KILLED the stage runs of this machine still RUNNING whose process no longer exists: a SIGKILL
    cannot be caught, so the killed stage could not close its own run. Returns their ids."""
    import psutil

    host = process_space()
    stale = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    closed = []
    for run in stale:
        pid = int(run.data.tags.get(PID_TAG, "0") or 0)
        if pid and pid != os.getpid() and not psutil.pid_exists(pid):
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        logging.getLogger(__name__).warning(
            "closed %d MLflow run(s) left RUNNING by a killed stage as KILLED: %s", len(closed), closed
        )
    return closed


def _open_stage_run(
    client: Any, stage: str, params: Params, default_store: bool, offline_for: str | None = None
) -> StageRun:
    """Create (or find) the parent, create the child and log the params; a failure on the way closes the
    runs already created (FAILED, or KILLED when interrupted) instead of leaving them RUNNING."""
    experiment_id = _experiment_id(client, params.mlflow.experiment, default_store)
    _close_dead_runs(client, experiment_id)
    key = pipeline_key()
    parent_id = _parent_run_id(client, experiment_id, key, params, offline_for)
    opened = [parent_id]
    try:
        tags = {
            "mlflow.parentRunId": parent_id,
            KEY_TAG: key,
            ROLE_TAG: "stage",
            "stage": stage,
            "mlflow.source.git.commit": head_commit(),
            HOST_TAG: process_space(),
            PID_TAG: str(os.getpid()),
        }
        if offline_for:
            tags[OFFLINE_TAG] = offline_for
        child = client.create_run(experiment_id, run_name=stage, tags=tags)
        opened.insert(0, child.info.run_id)
        run = StageRun(client, child.info.run_id, parent_id, experiment_id)
        run.log_params(params.as_flat_dict(), to_parent=True)
    except BaseException as exc:
        _terminate(client, opened, run_status(exc), exc)
        raise
    return run


@contextlib.contextmanager
def stage_run(stage: str, params: Params, outputs: Sequence[Path] = ()) -> Iterator[StageRun]:
    """Run the block as ``stage``: the one harness every stage's main() opens before its work.

    It takes the checkout's stage lock (``stage_lock``) and checks that the tracking server answers
    (``tracking.required``, see the module's docstring), both before any compute; then it opens the stage's
    child run under this pipeline run's parent and logs the effective params to both; the block logs
    metrics, tags and artifacts through the yielded run. When the block ends, both runs are closed
    FINISHED; on an exception FAILED, on Ctrl-C or SIGTERM KILLED, and ``outputs`` (the stage's dvc.yaml
    outs) are deleted first, so a failed stage leaves nothing DVC or a reader could take for its result.
    Deleting on failure cannot change a successful result, which is why this module stays out of the
    stages' dvc.yaml deps; the outputs themselves are written by the stage (core.data's atomic helpers).
    """
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    with stage_lock(stage), _sigterm_raises():
        import mlflow
        from mlflow.tracking import MlflowClient

        # Read before set_tracking_uri, which exports MLFLOW_TRACKING_URI for child processes.
        default_store = "MLFLOW_TRACKING_URI" not in os.environ
        uri, offline_for = tracking_uri(), None
        reason = unreachable_reason(uri)
        if reason is None and (refused := login_refused(stage, uri)) is not None:
            raise refused
        if reason is not None:
            if params.tracking.required:
                raise TrackingUnreachable(_unreachable_message(stage, uri, reason))
            uri, offline_for, default_store = local_store_uri(), uri, True
            print(
                f"{stage}: the MLflow tracking server at {offline_for} (MLFLOW_TRACKING_URI) does not answer "
                f"({reason}); tracking.required is false, so this stage logs to the local store {uri}."
            )
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        run: StageRun | None = None
        try:
            run = _open_stage_run(client, stage, params, default_store, offline_for)
            yield run
        except BaseException as exc:
            if run is None and getattr(exc, "error_code", None) == "PERMISSION_DENIED":
                # A reader's login: refused before any compute, so the old outputs stay.
                raise TrackingLoginRefused(
                    f"{stage}: the MLflow tracking server at {uri} does not let "
                    f"{USERNAME_VAR}={os.environ.get(USERNAME_VAR)} create runs (403). Nothing was computed.",
                    "ask its operator for the editor role (team_server users role NAME --role editor)",
                ) from None
            remove_outputs(*outputs)
            if run is not None:  # None: the opening failed and closed the runs it had created
                _terminate(client, (run.run_id, run.parent_id), run_status(exc), exc)
            raise
        # The parent ends with its latest stage (a later stage of the same pipeline run re-closes it).
        _terminate(client, (run.run_id, run.parent_id), "FINISHED", None)
        if offline_for is not None:
            print(
                f"{stage}: logged to the local store {uri}, not to {offline_for}. Once that server answers, "
                f"copy the runs to it with: {offline_hint(offline_for)}"
            )
