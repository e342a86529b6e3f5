"""All-or-nothing outputs: every file or folder a stage writes appears whole or not at all, flushed to disk
before the rename that puts it in place, and a full disk is reported as such (``DiskFullError``). Standard
library only: any layer may write its results through it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cifar10_pipeline.core.errors import PipelineError


class DiskFullError(PipelineError, OSError):
    """An output could not be written: its file system is full (nothing half-written is left)."""


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC, also where a library reports it only in its message (safetensors' Rust writer does)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 1e6:.1f} MB free"
    except OSError:
        return "free space unknown"


SCRATCH_SUFFIX = ".partial"  # the scratch folder of an output being written: `.<name>.<random>.partial`


def _fsync_tree(path: Path) -> None:
    """Flush ``path`` (a file, or a folder and everything in it) to disk, so that a rename which follows
    cannot be persisted before the data it points to (a power cut after os.replace would otherwise leave a
    complete-looking name over empty blocks)."""
    paths = [path] if path.is_file() else [*sorted(path.rglob("*")), path]
    for item in paths:
        if not item.is_symlink():
            _fsync(item)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it into place only if the block succeeds.

    A crash, a SIGKILL or an exception leaves ``target`` as it was before, or absent, never half-written (no
    partial outputs for DVC to cache or for a reader to take for a result). Works for files and folders:
    the staged data are flushed to disk, then one rename puts them in place. A folder target that already
    exists is first renamed into the scratch folder (one rename, so no half-deleted old folder remains
    either), then removed. The scratch folder, ``.<name>.<random>.partial`` beside the target, is removed
    afterwards; one left by a killed process is removed by the next write of the same target.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*{SCRATCH_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a process killed while writing this target
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=SCRATCH_SUFFIX, dir=target.parent))
    staged = scratch / target.name
    try:
        yield staged
        if not staged.exists():
            raise RuntimeError(f"nothing was written to the staged output for {target}")
        _fsync_tree(staged)
        if target.is_dir() and not target.is_symlink():
            target.rename(scratch / f"{target.name}.old")  # out of the way in one step, removed below
        elif staged.is_dir() and (target.is_symlink() or target.exists()):
            target.unlink()  # a folder cannot replace a file or a link in one rename
        os.replace(staged, target)  # atomic for a file over a file, and for a folder into a free name
        _fsync(target.parent)  # the rename itself
    except Exception as exc:
        if _is_disk_full(exc):
            raise DiskFullError(
                f"no space left on the device that holds {target.parent} while writing {target} "
                f"({_free_space(target.parent)}): {exc}. Free some space there (or move the project to a "
                "larger disk) and run the stage again; nothing half-written was left."
            ) from exc
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_json_atomic(target: Path, data: object) -> None:
    """Write ``data`` as indented JSON (the format of every metrics file) to ``target``, all or nothing."""
    with atomic_output(target) as staged:
        staged.write_text(json.dumps(data, indent=2) + "\n")


def remove_outputs(*paths: Path) -> None:
    """Delete stale outputs so a failed stage leaves nothing DVC could mistake for a result."""
    for path in paths:
        _remove(Path(path))
