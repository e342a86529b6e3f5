"""Back up a team server (PostgreSQL and both S3 buckets) into a folder, and restore it into another stack.

    python -m cifar10_pipeline.tracking.team_server backup /backups/team-2026-12-07
    python -m cifar10_pipeline.tracking.team_server --home NEW_HOME restore /backups/team-2026-12-07 [--force]

A backup folder holds ``manifest.json``, ``databases/<name>.dump`` (``pg_dump -Fc`` of every database of the
cluster but the templates and ``postgres``: MLflow's store, and any other the stack adds, such as a permission
store), ``databases/globals.sql`` (``pg_dumpall --globals-only --no-role-passwords``: the roles, for
reference; the restoring stack keeps its own) and ``objects/<sha256>``: every object of the artifact bucket
and the DVC bucket, stored once per content. The manifest lists each bucket's keys with their size and
sha256, each dump with its sha256, the MLflow and PostgreSQL versions and the time the backup was made.
``secrets/`` (0700, each file 0600) holds the stack's MLflow logins, the admin's password and each ``users
add`` user's: the restored permission store keeps their password hashes, so the restoring stack takes these
files over and every login, the admin's included, works there with its old password (the stack's database
password and S3 keys stay its own).

The database is dumped before the buckets are copied: objects are only ever added while a server runs, so
every artifact a dumped row points at is in the copy (the copy may hold a few objects no row names yet).

``restore`` checks every checksum of the backup before it writes anything; refuses a stack that already
holds runs, models or objects unless ``--force``; restores each database into a staging database first and
swaps them in only once all of them restored and all objects were uploaded (objects uploaded before a failure
are deleted again), so a bad backup leaves the stack as it was. The swap is one transaction (every live
database renamed aside and every staging one renamed into its place, then committed), so a failure or a
crash during it leaves every database as it was, never one of them gone. The MLflow server is stopped for
the swap and started again afterwards.

Database objects are restored owned by the stack's own database user (``--no-owner --no-acl``) and the S3
objects written with the stack's own keys, so a backup restores into a stack with other passwords and keys.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cifar10_pipeline.core.errors import PipelineError
from cifar10_pipeline.tracking.team_server import (
    ADMIN_USER,
    DB_USER,
    Config,
    TeamServer,
    TeamServerError,
    pg_binary,
)

MANIFEST = "manifest.json"
FORMAT = 1
# The bucket roles a backup carries, by the Config field naming each role's bucket in a stack.
BUCKET_ROLES = {"artifacts": "artifact_bucket", "dvc": "dvc_bucket"}
SKIPPED_DATABASES = ("postgres",)  # initdb's maintenance database: nothing of the stack lives there
STAGING_PREFIX = "restore_staging_"
RETIRED_PREFIX = "restore_replaced_"  # a live database renamed aside by the swap, dropped once it committed
CHUNK = 1 << 20


class BackupError(PipelineError):
    """A backup that cannot be made or restored; the message says what, the hint what to do."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class Stack:
    """The database and S3 side of one team server home, as backup and restore use them."""

    def __init__(self, home: Path):
        self.server = TeamServer(home)
        try:
            self.config: Config = self.server.load_config()
        except TeamServerError as error:
            raise BackupError(
                str(error), "pass --home (or set CIFAR10_TEAM_HOME) to the stack's folder"
            ) from None
        self.home = self.server.home

    # --- PostgreSQL ----------------------------------------------------------------------------------

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        try:
            connection = psycopg2.connect(
                host="127.0.0.1", port=self.config.ports["postgres"], user=DB_USER,
                password=self.server.db_password(), dbname=dbname, connect_timeout=10,
            )  # fmt: skip
        except psycopg2.OperationalError as error:
            raise BackupError(
                f"cannot reach the stack's PostgreSQL on 127.0.0.1:{self.config.ports['postgres']}: "
                f"{str(error).strip()}",
                f"start it: python -m cifar10_pipeline.tracking.team_server --home {self.home} start",
            ) from None
        connection.autocommit = True  # CREATE/DROP/ALTER DATABASE cannot run in a transaction
        return connection

    def sql(self, query: str, dbname: str = "postgres", args: tuple = ()) -> list[tuple]:
        connection = self.connect(dbname)
        try:
            with connection.cursor() as cursor:
                cursor.execute(query, args)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    def databases(self) -> list[str]:
        rows = self.sql("SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY datname")
        return [
            name
            for (name,) in rows
            if name not in SKIPPED_DATABASES and not name.startswith((STAGING_PREFIX, RETIRED_PREFIX))
        ]

    def pg_env(self) -> dict[str, str]:
        """libpq's password file for every database of the cluster (pg_dump, pg_restore): no password on a
        command line. Rewritten at each use, mode 0600, in the stack's secrets folder."""
        path = self.server.secrets / "pgpass_all"
        self.server.secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"127.0.0.1:{self.config.ports['postgres']}:*:{DB_USER}:{self.server.db_password()}\n")
        return {**os.environ, "PGPASSFILE": str(path), "PGCONNECT_TIMEOUT": "10"}

    def pg_tool(self, tool: str, *args: str, timeout: float = 1800) -> None:
        # A client tool over TCP: it runs as the calling user (as root too), and writes files it owns.
        command = [
            pg_binary(tool),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.config.ports["postgres"]),
            "-U",
            DB_USER,
        ]
        done = subprocess.run(
            [*command, "--no-password", *args], env=self.pg_env(), capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise BackupError(
                f"{tool} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}"
            )

    # --- S3 ------------------------------------------------------------------------------------------

    def s3(self):
        return self.server.s3_client(self.config)

    def bucket(self, role: str) -> str:
        return getattr(self.config, BUCKET_ROLES[role])

    def objects(self, role: str) -> Iterator[dict[str, Any]]:
        for page in self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket(role)):
            yield from page.get("Contents", [])

    # --- MLflow logins -------------------------------------------------------------------------------

    def login_files(self) -> dict[str, Path]:
        """secrets/-relative name -> file of every MLflow login's password: the admin's and the users'."""
        files = {f"users/{path.name}": path for path in sorted((self.server.secrets / "users").glob("*"))}
        admin = self.server.password_file(ADMIN_USER)
        if admin.is_file():
            files[admin.relative_to(self.server.secrets).as_posix()] = admin
        return files

    # --- MLflow --------------------------------------------------------------------------------------

    def mlflow_running(self) -> bool:
        return bool(self.server.status(self.config)["mlflow"]["running"])

    def holdings(self) -> list[str]:
        """What the stack already holds, in words (empty for a fresh stack): runs, models, experiments
        beyond MLflow's Default, objects in either bucket, databases of the backup that hold tables."""
        held = []
        if "mlflow" in self.databases():
            tables = {name for (name,) in self.sql("SELECT tablename FROM pg_tables", dbname="mlflow")}
            for table, what, where in (
                ("runs", "run(s)", ""),
                ("registered_models", "registered model(s)", ""),
                ("experiments", "experiment(s) besides Default", " WHERE experiment_id <> 0"),
            ):
                if table in tables:
                    (count,) = self.sql(f"SELECT count(*) FROM {table}{where}", dbname="mlflow")[0]
                    if count:
                        held.append(f"{count} {what}")
        for role in BUCKET_ROLES:
            count = sum(1 for _ in self.objects(role))
            if count:
                held.append(f"{count} object(s) in s3://{self.bucket(role)}")
        return held


@contextlib.contextmanager
def _s3_errors() -> Iterator[None]:
    """The S3 gateway down or refusing: a BackupError naming it, not a botocore traceback."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as error:
        raise BackupError(
            f"the stack's S3 gateway failed: {error}",
            "check that SeaweedFS runs: python -m cifar10_pipeline.tracking.team_server status",
        ) from None


def _mlflow_version() -> str:
    from importlib.metadata import version

    return version("mlflow")


def backup(home: Path, destination: Path) -> dict[str, Any]:
    """Write a backup of the stack in ``home`` to the new folder ``destination``; returns its manifest.

    Written into a temporary folder beside ``destination`` and renamed at the end: a failed backup leaves no
    folder that could be taken for a backup."""
    with _s3_errors():
        return _backup(Stack(home), Path(destination).resolve())


def _backup(stack: Stack, destination: Path) -> dict[str, Any]:
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise BackupError(
            f"{destination} exists and is not an empty folder", "pick a new folder for the backup"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        manifest = _write_backup(stack, staging)
        manifest["seconds"] = round(time.monotonic() - started, 2)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if destination.exists():
            destination.rmdir()
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_backup(stack: Stack, folder: Path) -> dict[str, Any]:
    (folder / "databases").mkdir()
    (folder / "objects").mkdir()
    server_version = stack.sql("SHOW server_version")[0][0]
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    # The databases first, then the buckets (see the module's docstring).
    databases = []
    for name in stack.databases():
        dump = folder / "databases" / f"{name}.dump"
        stack.pg_tool("pg_dump", "-Fc", "--no-owner", "--no-acl", "-f", str(dump), name)
        databases.append({"name": name, "file": f"databases/{name}.dump", "size": dump.stat().st_size,
                          "sha256": sha256_file(dump)})  # fmt: skip
    if not databases:
        raise BackupError(f"the stack in {stack.home} has no database to back up", "start it once: `start`")
    logins = _copy_logins(stack, folder / "secrets")
    globals_sql = folder / "databases" / "globals.sql"
    stack.pg_tool("pg_dumpall", "--globals-only", "--no-role-passwords", "-f", str(globals_sql))
    buckets = {}
    client = stack.s3()
    for role in BUCKET_ROLES:
        listed = []
        for item in stack.objects(role):
            key = item["Key"]
            part = folder / "objects" / ".download"
            client.download_file(stack.bucket(role), key, str(part))
            digest, size = sha256_file(part), part.stat().st_size
            part.replace(folder / "objects" / digest)  # same content, same file: stored once
            listed.append({"key": key, "size": size, "sha256": digest})
        buckets[role] = {"bucket": stack.bucket(role), "objects": listed}
    return {
        "format": FORMAT,
        "created": created,
        "mlflow_version": _mlflow_version(),
        "postgres_version": server_version,
        "source_home": str(stack.home),
        "databases": databases,
        "globals": {"file": "databases/globals.sql", "sha256": sha256_file(globals_sql)},
        "secrets": logins,
        "buckets": buckets,
    }


def _copy_logins(stack: Stack, folder: Path) -> list[dict[str, str]]:
    """The stack's MLflow login passwords into ``folder`` (0700, files 0600): the manifest's entries."""
    folder.mkdir(mode=0o700)
    entries = []
    for name, path in stack.login_files().items():
        copy = stack.server._write_private(folder / name, path.read_text())
        entries.append({"file": f"secrets/{name}", "sha256": sha256_file(copy)})
    return entries


def read_manifest(source: Path) -> dict[str, Any]:
    path = Path(source) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackupError(
            f"{source} is not a backup: no {MANIFEST}", "pass the folder `backup` wrote"
        ) from None
    except json.JSONDecodeError as error:
        raise BackupError(
            f"{path} is not valid JSON ({error})", "the backup is damaged: use another one"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BackupError(f"{path}: backup format {found!r}, this version reads {FORMAT}")
    try:
        _check_shape(manifest)
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise BackupError(
            f"{path} is malformed ({type(error).__name__}: {error})", "the backup is damaged: use another one"
        ) from None
    return manifest


SHA256 = re.compile(r"[0-9a-f]{64}")
DATABASE_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")
LOGIN_FILE = re.compile(r"secrets/(mlflow_admin_password|users/[A-Za-z0-9_-][A-Za-z0-9._-]*)")


def _check_shape(manifest: dict[str, Any]) -> None:
    """Every name a restore turns into a path or an SQL identifier is one of ours: no ``../``, no quotes."""
    for entry in manifest["databases"]:
        if not DATABASE_NAME.fullmatch(entry["name"]) or entry["file"] != f"databases/{entry['name']}.dump":
            raise ValueError(f"database entry {entry!r}")
        if not SHA256.fullmatch(entry["sha256"]):
            raise ValueError(f"sha256 {entry['sha256']!r}")
    for entry in manifest["secrets"]:
        if not LOGIN_FILE.fullmatch(entry["file"]) or not SHA256.fullmatch(entry["sha256"]):
            raise ValueError(f"secrets entry {entry!r}")
    if manifest["globals"]["file"] != "databases/globals.sql":
        raise ValueError(f"globals file {manifest['globals']['file']!r}")
    for listing in manifest["buckets"].values():
        for entry in listing["objects"]:
            if not SHA256.fullmatch(entry["sha256"]) or not isinstance(entry["key"], str):
                raise ValueError(f"object entry {entry!r}")
            int(entry["size"])


def verify(source: Path, manifest: dict[str, Any]) -> list[str]:
    """Every file the manifest names, checked against its sha256 (and size): the problems found."""
    source = Path(source)
    expected = [(entry["file"], entry["sha256"], entry.get("size")) for entry in manifest["databases"]]
    expected.append((manifest["globals"]["file"], manifest["globals"]["sha256"], None))
    expected += [(entry["file"], entry["sha256"], None) for entry in manifest["secrets"]]
    for listing in manifest["buckets"].values():
        expected += [(f"objects/{o['sha256']}", o["sha256"], o["size"]) for o in listing["objects"]]
    problems, checked = [], set()
    for relative, digest, size in expected:
        if relative in checked:
            continue
        checked.add(relative)
        path = source / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif size is not None and path.stat().st_size != size:
            problems.append(f"{relative}: {path.stat().st_size} bytes, the manifest says {size}")
        elif sha256_file(path) != digest:
            problems.append(f"{relative}: sha256 differs from the manifest's")
    return problems


def restore(home: Path, source: Path, force: bool = False) -> dict[str, Any]:
    """Restore the backup in ``source`` into the stack in ``home`` (running: PostgreSQL and SeaweedFS at
    least). Returns a summary: databases, objects, seconds, and a note when MLflow's version differs."""
    started = time.monotonic()
    source = Path(source).resolve()
    manifest = read_manifest(source)
    problems = verify(source, manifest)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise BackupError(
            f"the backup in {source} fails its manifest's checksums, nothing was restored: {shown}",
            "the backup is damaged or incomplete: restore another one",
        )
    with _s3_errors():
        return _restore(Stack(home), source, manifest, force, started)


def _restore(
    stack: Stack, source: Path, manifest: dict[str, Any], force: bool, started: float
) -> dict[str, Any]:
    if set(manifest["buckets"]) != set(BUCKET_ROLES):
        raise BackupError(f"{source}: buckets {sorted(manifest['buckets'])}, expected {sorted(BUCKET_ROLES)}")
    held = stack.holdings()
    if held and not force:
        raise BackupError(
            f"the stack in {stack.home} is not empty ({', '.join(held)}): restoring would replace it",
            "restore into a fresh stack (a new --home), or pass --force to replace what it holds",
        )
    uploaded = _upload_objects(stack, source, manifest)
    mlflow_was_running = stack.mlflow_running()
    same_release = manifest["mlflow_version"] == _mlflow_version()
    try:
        staged = _stage_databases(stack, source, manifest)
    except BaseException:
        _delete_objects(stack, uploaded)
        raise
    if mlflow_was_running:  # nothing may hold a connection to the databases being swapped
        stack.server.stop(stack.config, ("mlflow",))
    try:
        try:
            replaced = swap_databases(stack, staged)
        except BaseException:
            _drop_databases(stack, staged.values())
            _delete_objects(stack, uploaded)
            raise
        _drop_databases(stack, replaced)
        # The permission store now holds the backup's users and password hashes: their passwords with it.
        logins = _install_logins(stack, source, manifest)
        if force:  # the stack now holds what the backup holds, nothing more
            _delete_objects(stack, _objects_not_in(stack, manifest))
    finally:
        # On another MLflow release's schema the server would refuse to start: `upgrade` comes first.
        if mlflow_was_running and same_release:
            stack.server.start(stack.config, ("mlflow",))
    summary: dict[str, Any] = {
        "databases": sorted(staged),
        "logins": logins,
        "objects": {role: len(manifest["buckets"][role]["objects"]) for role in BUCKET_ROLES},
        "seconds": round(time.monotonic() - started, 2),
    }
    if not same_release:
        summary["note"] = (
            f"the backup was made with MLflow {manifest['mlflow_version']}, this is {_mlflow_version()}: "
            "MLflow is left stopped; run `upgrade`, then `start`"
        )
    return summary


def _install_logins(stack: Stack, source: Path, manifest: dict[str, Any]) -> list[str]:
    """The backup's login passwords into the stack's secrets/ (0600), replacing its own; a user file the
    backup lacks is removed (the restored store has no such user). Returns the users' names."""
    secrets = stack.server.secrets
    keep = {entry["file"].removeprefix("secrets/") for entry in manifest["secrets"]}
    for name, path in stack.login_files().items():
        if name not in keep:
            path.unlink()
    for entry in manifest["secrets"]:
        stack.server._write_private(secrets / entry["file"].removeprefix("secrets/"),
                                    (source / entry["file"]).read_text())  # fmt: skip
    return sorted(name.removeprefix("users/") for name in keep if name.startswith("users/"))


def _upload_objects(stack: Stack, source: Path, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """Put every object of the backup into its bucket; returns the keys that were not there before. On a
    failure, deletes those again and re-raises (keys a forced restore overwrote keep the backup's bytes)."""
    client, created = stack.s3(), []
    try:
        for role, listing in manifest["buckets"].items():
            bucket = stack.bucket(role)
            existing = {o["Key"] for o in stack.objects(role)}
            for entry in listing["objects"]:
                client.upload_file(str(source / "objects" / entry["sha256"]), bucket, entry["key"])
                if entry["key"] not in existing:
                    created.append((bucket, entry["key"]))
    except BaseException:
        _delete_objects(stack, created)
        raise
    return created


def _objects_not_in(stack: Stack, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    extra = []
    for role, listing in manifest["buckets"].items():
        keep = {entry["key"] for entry in listing["objects"]}
        extra += [(stack.bucket(role), o["Key"]) for o in stack.objects(role) if o["Key"] not in keep]
    return extra


def _delete_objects(stack: Stack, objects: list[tuple[str, str]]) -> None:
    client = stack.s3()
    for bucket, key in objects:
        client.delete_object(Bucket=bucket, Key=key)


def _retired(name: str) -> str:
    return f"{RETIRED_PREFIX}{name}"[:63]  # PostgreSQL's longest name


def _drop_databases(stack: Stack, names: Iterable[str]) -> None:
    for name in names:
        stack.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def swap_databases(stack: Stack, staged: dict[str, str]) -> list[str]:
    """Put each staging database of ``staged`` (name -> staging name) in its live database's place, all or
    none: one transaction renames every live database aside and every staging one into its place
    (PostgreSQL runs ALTER DATABASE RENAME in a transaction, unlike DROP), so an error or a crash before
    the commit leaves the live databases as they were. Returns the renamed-aside databases, for the caller
    to drop (a crash before it does leaves them to the next restore, which drops them first)."""
    import psycopg2

    replaced = sorted(set(stack.databases()) & set(staged))
    if replaced:  # renaming needs a database nobody is connected to: end the sessions left on the live ones
        stack.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
            args=(replaced,),
        )
    connection = stack.connect()
    connection.autocommit = False
    try:
        with connection.cursor() as cursor:
            for name, staging in staged.items():
                if name in replaced:
                    cursor.execute(f'ALTER DATABASE "{name}" RENAME TO "{_retired(name)}"')
                cursor.execute(f'ALTER DATABASE "{staging}" RENAME TO "{name}"')
        connection.commit()
    except psycopg2.Error as error:
        connection.rollback()
        raise BackupError(
            f"the restored databases could not be swapped in ({str(error).strip()}); the stack's databases "
            "are as they were and nothing of the backup was kept",
            "close the sessions connected to the stack's databases (psql, a server), then restore again",
        ) from None
    finally:
        connection.close()
    return [_retired(name) for name in replaced]


def _stage_databases(stack: Stack, source: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """pg_restore each dump into a fresh staging database: name -> staging name. Dropped again on failure."""
    staged: dict[str, str] = {}
    # Left by a restore interrupted after its swap committed: the databases it replaced.
    leftovers = stack.sql(
        "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", args=(RETIRED_PREFIX,)
    )
    _drop_databases(stack, (name for (name,) in leftovers))
    try:
        for entry in manifest["databases"]:
            staging = f"{STAGING_PREFIX}{entry['name']}"[:63]  # PostgreSQL's longest name
            stack.sql(f'DROP DATABASE IF EXISTS "{staging}" WITH (FORCE)')  # left by an interrupted restore
            stack.sql(f"CREATE DATABASE \"{staging}\" TEMPLATE template0 ENCODING 'UTF8'")
            staged[entry["name"]] = staging
            stack.pg_tool(
                "pg_restore", "--no-owner", "--no-acl", "--exit-on-error", "-d", staging,
                str(source / entry["file"]),
            )  # fmt: skip
    except BaseException:
        for staging in staged.values():
            stack.sql(f'DROP DATABASE IF EXISTS "{staging}" WITH (FORCE)')
        raise
    return staged


# --- command line (wired into team_server's main) --------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction) -> None:
    make = sub.add_parser("backup", help="back up PostgreSQL and both buckets into a new folder")
    make.add_argument("destination", type=Path, metavar="DEST", help="a folder that does not exist yet")
    back = sub.add_parser("restore", help="restore a backup into this (fresh) stack")
    back.add_argument("source", type=Path, metavar="SRC", help="a folder written by `backup`")
    back.add_argument("--force", action="store_true", help="replace what a non-empty stack holds")


def run_command(args: argparse.Namespace) -> int:
    """``backup`` or ``restore``; a user-fixable problem is printed as error:/hint: lines, exit 1."""
    import sys

    try:
        if args.command == "backup":
            manifest = backup(args.home, args.destination)
            objects = sum(len(b["objects"]) for b in manifest["buckets"].values())
            names = ", ".join(d["name"] for d in manifest["databases"])
            print(f"backup in {Path(args.destination).resolve()}: database(s) {names}, {objects} object(s), "
                  f"{manifest['seconds']:.1f} s")  # fmt: skip
        else:
            summary = restore(args.home, args.source, force=args.force)
            print(f"restored database(s) {', '.join(summary['databases'])}, "
                  f"{sum(summary['objects'].values())} object(s) and the admin's and "
                  f"{len(summary['logins'])} user(s)' logins in {summary['seconds']:.1f} s")  # fmt: skip
            if "note" in summary:
                print(f"note: {summary['note']}")
        return 0
    except (BackupError, TeamServerError) as error:
        print(f"error: {error}", file=sys.stderr)
        if getattr(error, "hint", None):
            print(f"hint: {error.hint}", file=sys.stderr)
        return 1
