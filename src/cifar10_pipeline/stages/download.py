"""Stage 1, download: bring CIFAR-10 into ``data/raw/`` as Parquet shards with verified checksums.

Sources, tried in the order of ``download.sources`` (a param like any other: ``-S 'download.sources=[hub]'``):
  mirror  a local folder in the Hub's uoft-cs/cifar10 Parquet schema with a SHA256SUMS file
          (``download.mirror_dir``)
  hub     the Hugging Face Hub dataset ``download.hub_repo`` (sha256 checked against the Hub's LFS metadata)
  url     the original cifar-10-python.tar.gz (md5 checked), converted to the same Parquet schema

A source that does not deliver hands over to the next: an absent mirror, and any failure of a remote source
(network or server errors of any kind, a checksum mismatch, a file without a checksum, an unsafe archive).
The end summary lists each source tried and why it failed. A local mirror that is there but corrupt stops
the stage: it is the user's own copy, and it must be repaired, not routed around. Names from SHA256SUMS, the
Hub and the archive must be plain file names; absolute and ``..`` paths, and links inside the archive, are
refused; a mirror's file may be a symbolic link to a regular file (its bytes are checked like any file's).
The archive's pickled batches are read with an unpickler that builds only arrays, lists, bytes and ints.
Output appears all at once or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import pickle
import re
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import requests
from tqdm.auto import tqdm

from cifar10_pipeline.core.data import (
    SPLITS,
    DataError,
    check_file_name,
    read_checksums,
    verify_checksums,
    write_checksums,
    write_parquet_split,
)
from cifar10_pipeline.core.errors import PipelineError, run_cli
from cifar10_pipeline.core.hashing import CHECKSUM_FILE, file_digest, raw_data_fingerprint
from cifar10_pipeline.core.io import atomic_output, write_json_atomic
from cifar10_pipeline.core.params import DownloadParams, load_params
from cifar10_pipeline.core.paths import DATA_SOURCE, RAW_DIR
from cifar10_pipeline.tracking.runs import stage_run


class SourceUnavailable(PipelineError):
    """This source did not deliver (absent, unreachable, failing, or its files refused); the next source in
    ``download.sources`` is tried, and the end summary says why this one failed."""


# A local disk problem is not a source's fault: it stops the stage instead of trying the next source.
_LOCAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _network_errors() -> tuple[type[BaseException], ...]:
    """Every exception type a remote source's clients raise when the network or the server fails:
    OSError covers requests, urllib, socket and ssl errors and huggingface_hub's HTTP errors; httpx and
    httpx2 (the Hub client's HTTP library) have a hierarchy of their own."""
    kinds: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError")):
        with contextlib.suppress(ImportError, AttributeError):
            kinds.append(getattr(importlib.import_module(module), name))
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError

        kinds += [EntryNotFoundError, HFValidationError]
    return tuple(kinds)


def _is_local(error: BaseException) -> bool:
    return (
        isinstance(error, OSError) and error.errno in _LOCAL_ERRNOS and not isinstance(error, ConnectionError)
    )


def _reason(error: BaseException) -> str:
    """One line for the summary: the exception's type and first message line, and those of its root cause
    (the Hub client wraps a refused connection or an HTTP 500 in errors of its own)."""

    def first_line(exc: BaseException) -> str:
        lines = str(exc).strip().splitlines()
        return lines[0] if lines else "no message"

    root, seen = error, {id(error)}
    while (cause := root.__cause__ or root.__context__) is not None and id(cause) not in seen:
        root = cause
        seen.add(id(cause))
    reason = f"{type(error).__name__}: {first_line(error)}"
    if first_line(root) not in reason:
        reason += f" (cause: {type(root).__name__}: {first_line(root)})"
    return reason


@contextlib.contextmanager
def _remote(what: str) -> Iterator[None]:
    """Inside the block, a network or server failure becomes SourceUnavailable("<what>: <reason>")."""
    try:
        yield
    except _network_errors() as exc:
        if _is_local(exc):
            raise
        raise SourceUnavailable(f"{what}: {_reason(exc)}") from exc


def _mirror_dir(params: DownloadParams) -> Path | None:
    return Path(params.mirror_dir) if params.mirror_dir else None


def _check_mirror_file(mirror: Path, name: str) -> None:
    """A listed mirror file must be a regular file, or a symbolic link to one (large data often lives on
    another disk): what is copied is then the link's target, checked against SHA256SUMS like any file.
    A dangling link, or one to a folder, a device or a pipe (reading /dev/zero never ends), is refused."""
    source = mirror / name
    if source.is_symlink():
        target = Path(os.readlink(source))
        if not source.exists():
            raise DataError(
                f"mirror {mirror}: {name} is a symbolic link to {target}, which does not exist (a dangling "
                "link); restore the file it points to, or replace the link with the file"
            )
        if not stat.S_ISREG(source.stat().st_mode):
            raise DataError(
                f"mirror {mirror}: {name} is a symbolic link to {target}, which is not a regular file; "
                "point it at the data file itself"
            )
        return
    if not source.exists():
        raise DataError(f"mirror {mirror}: {name} is listed in {CHECKSUM_FILE} but missing")
    if not stat.S_ISREG(source.stat().st_mode):
        raise DataError(f"mirror {mirror}: {name} is not a regular file; put the data file itself there")


def fetch_mirror(params: DownloadParams, staging: Path) -> dict:
    """Copy a local mirror. An absent mirror hands over to the next source; a mirror that is there but
    corrupt or unverifiable stops the stage (it is the user's copy, and it must be repaired)."""
    mirror = _mirror_dir(params)
    fix = "set download.mirror_dir, e.g. dvc exp run -S download.mirror_dir=/path/to/cifar10"
    if mirror is None:
        raise SourceUnavailable(f"download.mirror_dir is not set ({fix})")
    if mirror.is_file():
        raise SourceUnavailable(f"mirror {mirror} is a file, not a folder ({fix})")
    if not mirror.is_dir():
        raise SourceUnavailable(f"mirror folder {mirror} does not exist ({fix})")
    if not (mirror / CHECKSUM_FILE).is_file():
        raise DataError(f"mirror {mirror} has no {CHECKSUM_FILE}; refusing to use unverifiable data")
    expected = read_checksums(mirror / CHECKSUM_FILE)  # refuses names with folders, '..' or absolute
    shards = sorted(name for name in expected if name.endswith(".parquet"))
    for split in SPLITS:
        if not any(name.startswith(f"{split}-") for name in shards):
            raise DataError(f"mirror {mirror}: {CHECKSUM_FILE} lists no {split}-*.parquet shard")
    for name in tqdm(shards, desc="copy mirror", unit="file"):
        source = mirror / name
        _check_mirror_file(mirror, name)
        shutil.copyfile(source, staging / name)
        actual = file_digest(staging / name)
        if actual != expected[name]:
            raise DataError(
                f"checksum mismatch for {source}: expected sha256 {expected[name]}, got {actual}. "
                "The mirror is corrupt; restore it from its origin."
            )
    return {"source": "mirror", "location": str(mirror), "files": shards}


SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _hub_shards(siblings: list, where: str) -> dict[str, tuple[str, str]]:
    """{local name: (path in the repo, sha256 from its LFS metadata)} of the train/test Parquet shards.

    A shard path that is absolute or climbs with ``..``, two shards with one name, or a shard without a
    sha256 in its LFS metadata is refused: every byte that reaches data/raw is verified."""
    shards: dict[str, tuple[str, str]] = {}
    for sibling in siblings:
        remote = sibling.rfilename
        if not remote.endswith(".parquet") or PurePosixPath(remote).name.split("-")[0] not in SPLITS:
            continue
        if remote.startswith("/") or "\\" in remote or ".." in PurePosixPath(remote).parts:
            raise SourceUnavailable(f"{where}: refusing the shard path {remote!r} (absolute, or with '..')")
        name = check_file_name(PurePosixPath(remote).name, where)
        sha256 = sibling.lfs.sha256 if sibling.lfs else None
        if not isinstance(sha256, str) or not SHA256.match(sha256):
            raise SourceUnavailable(
                f"{where}: {remote} has no sha256 in its LFS metadata (got {sha256!r}); refusing "
                "a file that cannot be verified"
            )
        if name in shards:
            raise SourceUnavailable(f"{where}: two shards named {name} ({shards[name][0]}, {remote})")
        shards[name] = (remote, sha256)
    for split in SPLITS:
        if not any(name.startswith(f"{split}-") for name in shards):
            raise SourceUnavailable(f"{where} holds no {split}-*.parquet shard")
    return shards


def fetch_hub(params: DownloadParams, staging: Path) -> dict:
    """Download the Parquet shards of ``download.hub_repo`` with the huggingface_hub client (its own
    settings apply: HF_ENDPOINT, HF_HOME, HF_TOKEN), each checked against its LFS sha256."""
    from huggingface_hub import HfApi, hf_hub_download

    where = f"Hugging Face Hub dataset {params.hub_repo}@{params.hub_revision}"
    with _remote(f"{where}: listing its files failed"):
        try:
            info = HfApi().dataset_info(params.hub_repo, revision=params.hub_revision, files_metadata=True)
        except (ValueError, KeyError, TypeError) as exc:  # an answer that is not a dataset listing
            raise SourceUnavailable(
                f"{where}: the Hub's answer is not a dataset listing ({_reason(exc)})"
            ) from exc
    revision = info.sha if isinstance(info.sha, str) and re.fullmatch(r"[0-9a-f]{40}", info.sha) else None
    if revision is None:
        raise SourceUnavailable(f"{where}: the Hub named no commit for the revision (got {info.sha!r})")
    shards = _hub_shards(info.siblings or [], where)
    names = []
    for name, (remote, sha256) in tqdm(sorted(shards.items()), desc="download hub", unit="file"):
        with _remote(f"{where}: downloading {remote} failed"):
            local = Path(hf_hub_download(params.hub_repo, remote, repo_type="dataset", revision=revision))
        shutil.copyfile(local, staging / name)
        actual = file_digest(staging / name)
        if actual != sha256:
            # The cached copy is bad: drop it (the snapshot link and its blob), so a retry downloads again.
            blob = local.resolve()
            local.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
            raise SourceUnavailable(
                f"{where}: checksum mismatch for {remote}: its LFS metadata says sha256 {sha256}, the file "
                f"downloaded has {actual}"
            )
        names.append(name)
    return {"source": "hub", "location": f"{params.hub_repo}@{revision}", "files": names}


def _download_url(url: str, target: Path) -> None:
    with _remote(f"could not download {url}"), requests.get(url, stream=True, timeout=30) as response:
        response.raise_for_status()
        total = int(response.headers.get("content-length", 0)) or None
        with (
            open(target, "wb") as handle,
            tqdm(total=total, unit="B", unit_scale=True, desc="download") as bar,
        ):
            for chunk in response.iter_content(chunk_size=1 << 20):
                handle.write(chunk)
                bar.update(len(chunk))


# The globals a CIFAR-10 python batch needs: numpy's array reconstruction (module names of numpy 1 and 2)
# and its dtype. A batch's dicts, lists, bytes, str and ints are pickle opcodes and need none.
_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR-10 batch holds; any other global (``os.system``, a
    class with a ``__reduce__``) is refused before it is looked up, so nothing of the file's runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a CIFAR-10 batch holds only dicts, lists, bytes, ints and numpy "
                "arrays"
            )
        return super().find_class(module, name)


def load_cifar_batch(stream: IO[bytes], where: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch as (N, 32, 32, 3) uint8 images and int64 labels, read with the restricted
    unpickler and checked; SourceUnavailable says what is wrong with it."""
    try:
        batch = _BatchUnpickler(stream, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise SourceUnavailable(f"{where}: refused: {_reason(exc)}") from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise SourceUnavailable(f"{where}: b'data' is not a uint8 array of shape (N, 3072)")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(type(x) is int for x in labels):
        raise SourceUnavailable(f"{where}: b'labels' is not a list of {len(data)} ints")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)


def _archive_members(tar: tarfile.TarFile, where: str, staging: Path) -> dict[str, tarfile.TarInfo]:
    """{file name: member} of the archive, refusing it whole when any member is a link, a device, absolute,
    climbs with ``..``, or fails tarfile's "data" extraction filter."""
    members: dict[str, tarfile.TarInfo] = {}
    for member in tar.getmembers():
        refuse = f"{where}: refusing the archive: member {member.name!r}"
        if member.issym() or member.islnk():
            raise SourceUnavailable(f"{refuse} is a link (to {member.linkname!r})")
        if not (member.isfile() or member.isdir()):
            raise SourceUnavailable(f"{refuse} is not a regular file or folder")
        path = PurePosixPath(member.name)
        if path.is_absolute() or member.name.startswith(("/", "\\")) or ".." in path.parts:
            raise SourceUnavailable(f"{refuse} has an absolute path or '..'")
        data_filter = getattr(tarfile, "data_filter", None)  # Python >= 3.11.4; the checks above stand alone
        try:
            if data_filter is not None:
                data_filter(member, str(staging))
        except tarfile.FilterError as exc:
            raise SourceUnavailable(f"{refuse}: {exc}") from None
        if member.isfile():
            if path.name in members:
                raise SourceUnavailable(f"{refuse} repeats the file name {path.name}")
            members[path.name] = member
    return members


def fetch_url(params: DownloadParams, staging: Path) -> dict:
    archive = staging / "cifar-10-python.tar.gz"
    _download_url(params.url, archive)
    md5 = file_digest(archive, "md5")
    if md5 != params.url_md5:
        raise SourceUnavailable(
            f"checksum mismatch for {params.url}: expected md5 {params.url_md5}, got {md5}"
        )
    batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = _archive_members(tar, params.url, staging)
            arrays = {}
            for split, names in batches.items():
                images, labels = [], []
                for name in names:
                    if name not in members:
                        raise SourceUnavailable(f"{params.url}: archive lacks {name}")
                    batch_images, batch_labels = load_cifar_batch(
                        tar.extractfile(members[name]), f"{params.url}: {members[name].name}"
                    )
                    images.append(batch_images)
                    labels.append(batch_labels)
                arrays[split] = (np.concatenate(images), np.concatenate(labels))
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise SourceUnavailable(f"{params.url}: not a readable tar.gz archive ({_reason(exc)})") from None
    archive.unlink()
    names = []
    for split, (images, labels) in arrays.items():
        name = f"{split}-00000-of-00001.parquet"
        write_parquet_split(staging / name, images, labels)
        names.append(name)
    return {"source": "url", "location": params.url, "md5": md5, "files": names}


FETCHERS: dict[str, Callable[[DownloadParams, Path], dict]] = {
    "mirror": fetch_mirror,
    "hub": fetch_hub,
    "url": fetch_url,
}


def download(params: DownloadParams, out_dir: Path = RAW_DIR, source_file: Path = DATA_SOURCE) -> dict:
    """Fetch CIFAR-10 from the first source that works into ``out_dir``; return what was fetched.

    ``source_file`` (a small JSON, kept in git) records which source and files the data came from; it
    lives outside ``out_dir`` so the data's own hash does not depend on where it was fetched from.
    """
    failures = []
    for source in params.sources:
        try:
            with atomic_output(Path(out_dir)) as staging:
                staging.mkdir()
                info = FETCHERS[source](params, staging)
                write_checksums(staging, info["files"])
                verify_checksums(staging)
                info["sha256"] = read_checksums(staging / CHECKSUM_FILE)
            write_json_atomic(source_file, info)
            print(f"download: CIFAR-10 from {source} ({info['location']}) -> {out_dir}")
            return info
        except SourceUnavailable as exc:
            print(f"download: {source} failed: {exc}")
            failures.append(f"  {source}: {exc}")
    raise DataError(
        f"no CIFAR-10 source worked (download.sources: {list(params.sources)}):\n" + "\n".join(failures),
        hint="point download.mirror_dir at a local mirror (dvc exp run -S download.mirror_dir=PATH), or run "
        "where the Hugging Face Hub or the original URL is reachable",
    )


def main() -> None:
    params = load_params()
    with stage_run("download", params, outputs=(RAW_DIR, DATA_SOURCE)) as run:
        info = download(params.download)
        run.log_params({"data.source": info["source"], "data.location": info["location"]})
        run.set_tags({"data.sha256sums": raw_data_fingerprint(RAW_DIR)})


if __name__ == "__main__":
    run_cli(main)
