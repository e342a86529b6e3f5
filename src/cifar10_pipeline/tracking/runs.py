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

A server that stops answering *during* a stage (killed, its database or object store gone) costs the stage
at most ``OUTAGE_BOUND_S`` seconds on one request (MLflow's own retry and timeout settings, set here for the
stage's process: ``HTTP_ENV``); the stage then goes on logging to the local store, whatever
``tracking.required`` says (the compute is under way), and prints the sync command. Its local runs are tagged
``pipeline.resumes`` with the server's run ids, and the sync command completes and closes those server
runs instead of copying new ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cifar10_pipeline.core.errors import PipelineError
from cifar10_pipeline.core.hashing import CHECKSUM_FILE, file_digest, raw_data_fingerprint
from cifar10_pipeline.core.io import remove_outputs
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
# A local run that goes on with a server run the server stopped answering for (its id): the sync command
# writes the local run's data into that run and closes it, rather than copying a new one.
RESUMES_TAG = "pipeline.resumes"
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

# MLflow's HTTP client, by default, retries a failing request 7 times with a 2 s exponential backoff and
# waits 120 s for each answer: a server that dies mid-stage froze the stage for about 12 minutes. The stage
# harness sets MLflow's own knobs for its process (whatever the user's environment says) so that one failing
# request costs at most OUTAGE_BOUND_S; a dead server (refused connection) or one answering 500 at once (its
# database gone) costs the backoff only, about 2 s; with its object store gone, the server itself retries
# S3 for seconds before each 500 (records/team_faults.json).
HTTP_MAX_RETRIES = 2
HTTP_TIMEOUT_S = 15  # per attempt, connect and each read; a proxied model upload answers within it
HTTP_BACKOFF_FACTOR = 1  # urllib3 sleeps 0 s before the first retry, then factor * 2**(n-1) s
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(HTTP_MAX_RETRIES),
    "MLFLOW_HTTP_REQUEST_TIMEOUT": str(HTTP_TIMEOUT_S),
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(HTTP_BACKOFF_FACTOR),
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
}
OUTAGE_BOUND_S = (HTTP_MAX_RETRIES + 1) * HTTP_TIMEOUT_S + sum(
    HTTP_BACKOFF_FACTOR * 2 ** (n - 1) for n in range(2, HTTP_MAX_RETRIES + 1)
)


@contextlib.contextmanager
def bounded_http() -> Iterator[None]:
    """MLflow's HTTP retry and timeout settings of ``HTTP_ENV`` inside the block (its child processes, such
    as torchrun's ranks, inherit them), the previous values restored afterwards."""
    before = {key: os.environ.get(key) for key in HTTP_ENV}
    os.environ.update(HTTP_ENV)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking server is gone or failing (no answer, a timeout, 5xx after MLflow's
    retries), as opposed to a request it refused (a bad value, a missing run), which is a real error."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, requests.exceptions.RequestException):
        return True
    if isinstance(exc, MlflowException):
        if exc.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            # 403/401 also read "API request to ...": the server answered and refused this login.
            return False
        return str(exc.message).startswith("API request to") or exc.error_code in (
            "INTERNAL_ERROR",
            "TEMPORARILY_UNAVAILABLE",
        )
    return False


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
REGISTRY_URI_VAR = "MLFLOW_REGISTRY_URI"
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
    params_hash = file_digest(PARAMS_FILE)[:8] if PARAMS_FILE.is_file() else "none"
    return f"repro-{head_commit()[:8]}-{params_hash}"


T = TypeVar("T")


class StageRun:
    """A stage's child run, with its parent, both written through one MlflowClient.

    Every write goes through ``tracked``: when the tracking server stops answering (``is_outage``), the
    run moves to the local store (``fallback``, set by ``stage_run``) and the write is done there."""

    def __init__(self, client: Any, run_id: str, parent_id: str, experiment_id: str):
        self.client = client
        self.run_id = run_id
        self.parent_id = parent_id
        self.experiment_id = experiment_id
        self.offline_for: str | None = None  # the server it stopped logging to, once moved
        self.fallback: Callable[[StageRun, BaseException, float], None] | None = None

    def tracked(self, operation: Callable[[], T]) -> T:
        """``operation()``; when the server stops answering inside it, the run moves to the local store and
        ``operation`` runs again there, from the start (it reads ``self``'s run ids when it runs)."""
        started = time.monotonic()
        try:
            return operation()
        except Exception as exc:
            if self.fallback is None or not is_outage(exc):
                raise
            fallback, self.fallback = self.fallback, None  # once: the local store's errors are real
            fallback(self, exc, time.monotonic() - started)
            return operation()

    def log_params(self, params: dict[str, Any], to_parent: bool = False) -> None:
        from mlflow.entities import Param

        entries = [Param(k, str(v)[:6000]) for k, v in params.items()]

        def write() -> None:
            for run_id in (self.run_id, self.parent_id) if to_parent else (self.run_id,):
                existing = self.client.get_run(run_id).data.params
                fresh = [p for p in entries if p.key not in existing]
                if fresh:
                    self.client.log_batch(run_id, params=fresh)

        self.tracked(write)

    def log_metrics(
        self, metrics: dict[str, float], step: int | None = None, to_parent: bool = False
    ) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        entries = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]

        def write() -> None:
            for run_id in (self.run_id, self.parent_id) if to_parent else (self.run_id,):
                self.client.log_batch(run_id, metrics=entries)

        self.tracked(write)

    def set_tags(self, tags: dict[str, str], to_parent: bool = False) -> None:
        def write() -> None:
            for run_id in (self.run_id, self.parent_id) if to_parent else (self.run_id,):
                for key, value in tags.items():
                    self.client.set_tag(run_id, key, value)

        self.tracked(write)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)

        def write() -> None:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path)

        self.tracked(write)

    def close(self, status: str, error: BaseException | None) -> None:
        """Close the child and its parent with ``status`` (see ``_terminate``)."""
        try:
            self.tracked(lambda: _terminate(self.client, (self.run_id, self.parent_id), status, None))
        except Exception as exc:
            if error is None:
                raise
            logging.getLogger(__name__).warning("could not mark MLflow runs %s: %s", status, exc)


def _experiment_id(client: Any, name: str, default_store: bool) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if default_store:  # beside the default SQLite store; a custom server decides for itself
        artifact_root = project_root() / ARTIFACT_ROOT
        artifact_root.mkdir(exist_ok=True)
        artifact_location = artifact_root.as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as error:
        # Another pipeline created it since the lookup (several writers starting at once on one server).
        experiment = client.get_experiment_by_name(name)
        if error.error_code != "RESOURCE_ALREADY_EXISTS" or experiment is None:
            raise
        return experiment.experiment_id


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
    if (RAW_DIR / CHECKSUM_FILE).is_file():
        tags["data.sha256sums"] = raw_data_fingerprint(RAW_DIR)
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
    cannot be caught, so the killed stage could not close its own run. Their parents go with them (a
    SIGKILLed `dvc exp run`, re-run under another name, would never come back to close its parent), unless
    another stage of theirs still runs. Returns the ids closed."""
    import psutil

    host = process_space()
    stale = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    closed, parents = [], set()
    for run in stale:
        pid = int(run.data.tags.get(PID_TAG, "0") or 0)
        if pid and pid != os.getpid() and not psutil.pid_exists(pid):
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
            if parent := run.data.tags.get("mlflow.parentRunId"):
                parents.add(parent)
    for parent_id in sorted(parents):
        if client.get_run(parent_id).info.status != "RUNNING":
            continue
        running = client.search_runs(
            [experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`mlflow.parentRunId` = '{parent_id}'",
            max_results=1,
        )
        if not running:
            client.set_terminated(parent_id, "KILLED")
            closed.append(parent_id)
    if closed:
        logging.getLogger(__name__).warning(
            "closed %d MLflow run(s) left RUNNING by a killed stage as KILLED: %s", len(closed), closed
        )
    return closed


def _stage_tags(stage: str, key: str, parent_id: str, offline_for: str | None) -> dict[str, str]:
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
    return tags


def _open_stage_run(
    client: Any,
    stage: str,
    params: Params,
    default_store: bool,
    offline_for: str | None = None,
    fallback: Callable[[StageRun, BaseException, float], None] | None = None,
) -> StageRun:
    """Create (or find) the parent, create the child and log the params; a failure on the way closes the
    runs already created (FAILED, or KILLED when interrupted) instead of leaving them RUNNING; not when the
    server stopped answering (each try would cost the outage bound again; the next stage closes them).
    ``fallback`` is the run's move to the local store, from the moment the child exists."""
    experiment_id = _experiment_id(client, params.mlflow.experiment, default_store)
    _close_dead_runs(client, experiment_id)
    key = pipeline_key()
    parent_id = _parent_run_id(client, experiment_id, key, params, offline_for)
    opened = [parent_id]
    try:
        tags = _stage_tags(stage, key, parent_id, offline_for)
        child = client.create_run(experiment_id, run_name=stage, tags=tags)
        opened.insert(0, child.info.run_id)
        run = StageRun(client, child.info.run_id, parent_id, experiment_id)
        run.fallback = fallback
        run.log_params(params.as_flat_dict(), to_parent=True)
    except BaseException as exc:
        if not is_outage(exc):
            _terminate(client, opened, run_status(exc), exc)
        raise
    return run


def _point_at_store(uri: str) -> Any:
    """A client on ``uri``, with the fluent API's tracking and registry URIs moved there too (the evaluate
    stage's model logging and registration use them); ``_registry_uri_restored`` undoes the registry's."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _registry_uri_restored() -> Iterator[None]:
    """Put the fluent registry URI (and MLFLOW_REGISTRY_URI, which mlflow.set_registry_uri exports) back as
    they were when the block ends: a stage called in-process (tests, a notebook) that fell back to the local
    store must not leave the caller's later registrations there."""
    before = os.environ.get(REGISTRY_URI_VAR)
    try:
        yield
    finally:
        if os.environ.get(REGISTRY_URI_VAR) != before:
            import mlflow

            mlflow.set_registry_uri(before)  # None clears the module's own setting
            if before is None:
                os.environ.pop(REGISTRY_URI_VAR, None)


def _move_offline(
    stage: str, params: Params, server_uri: str
) -> Callable[[StageRun, BaseException, float], None]:
    """What a stage's run does when the server stops answering mid-stage: the same child and parent are
    opened in the local store, tagged with the server run they continue (``RESUMES_TAG``), with the params,
    and the run's later writes go there."""

    def move(run: StageRun, exc: BaseException, waited: float) -> None:
        local = local_store_uri()
        reason = str(getattr(exc, "message", exc)).splitlines()[0][:300]
        print(
            f"{stage}: the MLflow tracking server at {server_uri} stopped answering mid-stage (gave up after "
            f"{waited:.1f} s, bound {OUTAGE_BOUND_S} s: {reason}); this stage goes on logging to the local "
            f"store {local}.",
            flush=True,
        )
        client = _point_at_store(local)
        experiment_id = _experiment_id(client, params.mlflow.experiment, default_store=True)
        key = pipeline_key()
        parent_id = _parent_run_id(client, experiment_id, key, params, offline_for=server_uri)
        parent_tags = client.get_run(parent_id).data.tags
        if RESUMES_TAG not in parent_tags and "pipeline.synced_to" not in parent_tags:
            client.set_tag(parent_id, RESUMES_TAG, run.parent_id)
        tags = {**_stage_tags(stage, key, parent_id, server_uri), RESUMES_TAG: run.run_id}
        child = client.create_run(experiment_id, run_name=stage, tags=tags)
        run.client, run.run_id, run.parent_id = client, child.info.run_id, parent_id
        run.experiment_id, run.offline_for = experiment_id, server_uri
        run.log_params(params.as_flat_dict(), to_parent=True)

    return move


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
    A server that stops answering after the check moves the runs to the local store (the module's
    docstring) within ``OUTAGE_BOUND_S``.
    """
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    with stage_lock(stage), _sigterm_raises(), bounded_http(), _registry_uri_restored():
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
            try:
                fallback = _move_offline(stage, params, uri) if offline_for is None else None
                run = _open_stage_run(client, stage, params, default_store, offline_for, fallback)
            except Exception as exc:
                if offline_for is not None or not is_outage(exc):
                    raise
                # Gone between the check and the stage's run (nothing computed yet): open in the local store.
                offline_for, uri = uri, local_store_uri()
                print(
                    f"{stage}: the MLflow tracking server at {offline_for} stopped answering while the "
                    f"stage's run was opened ({str(getattr(exc, 'message', exc)).splitlines()[0][:300]}); "
                    f"this stage logs to the local store {uri}.",
                    flush=True,
                )
                client = _point_at_store(uri)
                run = _open_stage_run(client, stage, params, True, offline_for)
            if run.offline_for is None:
                run.offline_for = offline_for
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
                run.close(run_status(exc), exc)
            raise
        # The parent ends with its latest stage (a later stage of the same pipeline run re-closes it).
        run.close("FINISHED", None)
        if run.offline_for is not None:
            print(
                f"{stage}: logged to the local store {local_store_uri()}, not to {run.offline_for}. Once "
                f"that server answers, copy the runs to it with: {offline_hint(run.offline_for)}",
                flush=True,
            )
