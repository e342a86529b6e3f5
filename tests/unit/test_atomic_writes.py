"""core.io.atomic_output under SIGKILL: a real child process killed at chosen points of a write."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cifar10_pipeline.core.errors import PipelineError
from cifar10_pipeline.core.io import SCRATCH_SUFFIX, DiskFullError, atomic_output

from ..conftest import PROJECT_ROOT

OLD = {"config.json": "old config", "model.safetensors": "old weights " * 100}

CHILD = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from pathlib import Path
    from cifar10_pipeline.core.io import atomic_output

    target, point = Path(sys.argv[1]), sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point == "rmtree":  # deleting the old folder: one file gone, then killed
        real = shutil.rmtree
        def rmtree(path, *args, **kwargs):
            next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
            die()
        shutil.rmtree = rmtree
    if point == "replace":  # the old folder moved out of the way, the new one not yet in
        os.replace = lambda *args: die()
    with atomic_output(target) as staged:
        staged.mkdir()
        (staged / "config.json").write_text("new config")
        if point == "writing":
            (staged / "model.safetensors").write_text("half of the new wei")
            die()
        (staged / "model.safetensors").write_text("new weights " * 100)
    """
)


def write_old(target: Path) -> None:
    target.mkdir(parents=True)
    for name, text in OLD.items():
        (target / name).write_text(text)


def kill_during(target: Path, point: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", CHILD, str(target), point], env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL


def contents(target: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in target.iterdir()}


@pytest.mark.reliability(
    "SIGKILL while a stage writes a model folder over an earlier one",
    "the earlier folder stays whole; the half-written one is only in a .partial scratch folder",
)
def test_a_kill_while_writing_leaves_the_old_folder_whole(tmp_path: Path) -> None:
    target = tmp_path / "models" / "cifar10"
    write_old(target)
    kill_during(target, "writing")
    assert contents(target) == OLD
    scratch = [p.name for p in target.parent.iterdir() if p != target]
    assert len(scratch) == 1 and scratch[0].startswith(".cifar10.") and scratch[0].endswith(SCRATCH_SUFFIX)


@pytest.mark.parametrize("point", ["rmtree", "replace"])
@pytest.mark.reliability(
    "SIGKILL while a finished folder output replaces the earlier one",
    "the folder is the earlier one, the new one or absent, never a mix or half-deleted",
)
def test_a_kill_while_replacing_never_leaves_a_mix(tmp_path: Path, point: str) -> None:
    target = tmp_path / "models" / "cifar10"
    write_old(target)
    kill_during(target, point)
    if target.exists():
        assert contents(target) in (
            OLD,
            {"config.json": "new config", "model.safetensors": "new weights " * 100},
        )


def test_the_next_write_sweeps_the_scratch_of_a_killed_one(tmp_path: Path) -> None:
    target = tmp_path / "models" / "cifar10"
    write_old(target)
    kill_during(target, "writing")
    with atomic_output(target) as staged:
        staged.mkdir()
        (staged / "config.json").write_text("newest")
    assert sorted(p.name for p in target.parent.iterdir()) == ["cifar10"]
    assert contents(target) == {"config.json": "newest"}


def test_a_file_replaces_a_file_in_one_rename(tmp_path: Path) -> None:
    target = tmp_path / "metrics" / "eval.json"
    target.parent.mkdir()
    target.write_text("old")
    inode_dir = target.parent.stat().st_ino
    with atomic_output(target) as staged:
        staged.write_text("new")
    assert target.read_text() == "new" and target.parent.stat().st_ino == inode_dir
    assert sorted(p.name for p in target.parent.iterdir()) == ["eval.json"]


@pytest.mark.parametrize(
    "full",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        # safetensors' Rust writer reports it only in its message
        Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space "
                  "left on device\" })"),
    ],
    ids=["errno", "message only"],
)  # fmt: skip
def test_a_full_disk_is_named_and_leaves_nothing(tmp_path: Path, full: Exception) -> None:
    target = tmp_path / "models" / "cifar10"
    expected = r"no space left on the device .* Free some space there"
    with pytest.raises(DiskFullError, match=expected) as error, atomic_output(target) as staged:
        staged.mkdir()
        (staged / "model.safetensors").write_bytes(b"half of the weights")
        raise full
    assert isinstance(error.value, PipelineError)  # printed as error:/hint: by the stages, no traceback
    assert list((tmp_path / "models").iterdir()) == []  # neither the target nor its scratch folder
