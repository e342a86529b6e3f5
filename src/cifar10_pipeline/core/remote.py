"""``cifar10 pull``: fetch the pipeline's outputs (data, model, reports) from a DVC remote, with the remote
checked first.

On a fresh clone the default remote, ``local``, is a folder beside the checkout that usually does not exist,
and DVC treats a missing folder as an empty remote: ``dvc pull`` answers "Checkout failed for following
targets ... Is your cache up to date?" and exits 0. ``pull`` says in one line what is missing instead (the
folder, the S3 endpoint or keys, an unreachable endpoint) and how to get a model without it, and only then
runs ``dvc pull``, so DVC does the fetching and its checks.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cifar10_pipeline.core.errors import PipelineError

CONNECT_TIMEOUT_S = 3.0
WITHOUT_REMOTE = (
    "without a remote: train one with the quick profile (dvc exp run -S profile=quick), or use a published "
    "model (cifar10 predict --model owner/name@revision)"
)


class RemoteUnavailable(PipelineError):
    """The DVC remote ``cifar10 pull`` would read is absent, unconfigured or unreachable."""


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    endpoint: str | None  # S3 remotes: the endpoint URL from .dvc/config(.local); None for AWS itself


def resolve_remote(project: Path, name: str | None = None) -> Remote:
    """The remote ``dvc pull`` would use in ``project`` (``name``, else the configured default), as DVC's own
    config reads it (local URLs made absolute, .dvc/config.local merged)."""
    from dvc.config import ConfigError
    from dvc.repo import Repo

    try:
        with Repo(str(project)) as repo:
            config = repo.config
    except ConfigError as exc:
        raise RemoteUnavailable(f"DVC's config in {project} is unreadable: {exc}") from None
    remotes = config.get("remote", {})
    chosen = name or config.get("core", {}).get("remote")
    if not chosen:
        configured = ", ".join(remotes) or "none"
        raise RemoteUnavailable(
            "no default DVC remote is set",
            f"name one: cifar10 pull -r NAME (configured: {configured}); or, {WITHOUT_REMOTE}",
        )
    if chosen not in remotes:
        raise RemoteUnavailable(
            f"no DVC remote named {chosen!r}",
            f"configured: {', '.join(remotes) or 'none'} (dvc remote list)",
        )
    entry = remotes[chosen]
    return Remote(chosen, str(entry["url"]), entry.get("endpointurl"))


def check_remote(remote: Remote) -> None:
    """Raise RemoteUnavailable, in one line with a hint, unless ``remote`` can be read from here."""
    scheme = urlsplit(remote.url).scheme
    if scheme in ("", "file"):
        folder = Path(urlsplit(remote.url).path if scheme else remote.url)
        if not folder.is_dir():
            raise RemoteUnavailable(
                f"the DVC remote {remote.name!r} is the folder {folder}, which does not exist on this "
                "machine",
                "point it at your team's copy (dvc remote modify local url /mnt/team/cifar10-dvc), use "
                f"the team server's (docs/team.md: cifar10 pull -r team), or, {WITHOUT_REMOTE}",
            )
        return
    if scheme == "s3" and remote.endpoint is not None:
        endpoint = urlsplit(remote.endpoint)
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        try:
            socket.create_connection((endpoint.hostname or "", port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise RemoteUnavailable(
                f"the DVC remote {remote.name!r} ({remote.url}) has its S3 endpoint at {remote.endpoint}, "
                f"which does not answer ({exc.strerror or exc})",
                "start the team server (python -m cifar10_pipeline.tracking.team_server start) or ask who "
                "runs it",
            ) from None
    elif scheme == "s3":
        raise RemoteUnavailable(
            f"the DVC remote {remote.name!r} ({remote.url}) has no S3 endpoint or keys on this machine",
            "write them into .dvc/config.local: python -m cifar10_pipeline.tracking.team_server dvc-remote "
            "(docs/team.md)",
        )


def pull(project: Path, remote_name: str | None, targets: Sequence[str]) -> int:
    """Check the remote, then ``dvc pull`` from it; DVC's exit status."""
    remote = resolve_remote(project, remote_name)
    check_remote(remote)
    print(f"pulling from the DVC remote {remote.name!r} ({remote.url})", file=sys.stderr)
    command = [sys.executable, "-m", "dvc", "pull", "--remote", remote.name, *targets]
    return subprocess.run(command, cwd=project, check=False).returncode
