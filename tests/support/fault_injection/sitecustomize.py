"""Test-only fault injection: kill one pipeline stage at a chosen point, deterministically.

tests/integration/test_faults.py puts this folder on PYTHONPATH and names a fault in CIFAR10_TEST_FAULT as
``<stage>:<point>``. Python imports ``sitecustomize`` at start-up in every process (dvc's too); only the
process running ``python -m cifar10_pipeline.stages.<stage>`` patches anything: it wraps one low-level
writer (or the training progress bar) so that, at the chosen point, it writes half of what it was given to
the path it was given, flushes it, and then SIGKILLs the stage (``:group`` points kill the whole process
group, ``dvc repro`` included, as a CI timeout or a power cut does). The product code has no hooks: what
the stage does up to the kill is exactly what it does in production.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

FAULT = os.environ.get("CIFAR10_TEST_FAULT", "")


def _die(group: bool = False) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if group:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _write_half(path: str | os.PathLike, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())


def _on_write_text(name: str) -> None:
    """Kill while Path.write_text writes a file called ``name`` (JSON metrics, Markdown reports)."""
    original = Path.write_text

    def write_text(self: Path, data: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.name == name:
            _write_half(self, data.encode())
            _die()
        return original(self, data, *args, **kwargs)

    Path.write_text = write_text  # type: ignore[method-assign]


def _on_copy(nth: int) -> None:
    """Kill while the download stage copies its ``nth`` Parquet shard (half of it copied)."""
    import shutil

    original = shutil.copyfile
    count = {"n": 0}

    def copyfile(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(dst).endswith(".parquet"):
            count["n"] += 1
            if count["n"] == nth:
                _write_half(dst, Path(src).read_bytes())
                _die()
        return original(src, dst, *args, **kwargs)

    shutil.copyfile = copyfile


def _on_savez(name: str) -> None:
    """Kill while numpy writes the ``name`` array file (data/processed/*.npz)."""
    import numpy as np

    original = np.savez

    def savez(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if getattr(file, "name", "").endswith(name):
            buffer = io.BytesIO()
            original(buffer, *args, **kwargs)
            data = buffer.getvalue()
            file.write(data[: len(data) // 2])
            file.flush()
            _die()
        return original(file, *args, **kwargs)

    np.savez = savez


def _on_safetensors() -> None:
    """Kill while save_pretrained writes model.safetensors (half of its bytes on disk)."""
    import safetensors.torch
    import transformers.modeling_utils as modeling_utils

    def save_file(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        _write_half(filename, safetensors.torch.save(tensors, metadata=metadata))
        _die()

    modeling_utils.safe_save_file = save_file


def _on_savefig(name: str) -> None:
    """Kill while matplotlib writes the figure called ``name``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(str(fname)).name == name:
            buffer = io.BytesIO()
            original(self, buffer, *args, format="png", **kwargs)
            _write_half(fname, buffer.getvalue())
            _die()
        return original(self, fname, *args, **kwargs)

    Figure.savefig = savefig  # type: ignore[method-assign]


def _on_train_step(step: int, group: bool) -> None:
    """Kill when the training progress bar reaches optimizer step ``step`` (mid-epoch: the test chooses)."""
    import tqdm.std

    original = tqdm.std.tqdm.update

    def update(self, n=1):  # type: ignore[no-untyped-def]
        result = original(self, n)
        if self.desc == "train" and self.n >= step:
            print(f"fault injection: SIGKILL at training step {self.n}", file=sys.stderr)
            _die(group)
        return result

    tqdm.std.tqdm.update = update  # type: ignore[method-assign]


def _on_register() -> None:
    """Kill when evaluate, its outputs written, starts registering the model in MLflow."""
    from cifar10_pipeline.tracking import model_registry

    def log_and_register(*args, **kwargs):  # type: ignore[no-untyped-def]
        _die()

    model_registry.log_and_register = log_and_register


def _install(stage: str, point: str) -> None:
    kind, _, arg = point.partition("=")
    if kind == "write_text":
        _on_write_text(arg)
    elif kind == "copy":
        _on_copy(int(arg))
    elif kind == "savez":
        _on_savez(arg)
    elif kind == "safetensors":
        _on_safetensors()
    elif kind == "savefig":
        _on_savefig(arg)
    elif kind in ("train_step", "train_step_group"):
        _on_train_step(int(arg), group=kind.endswith("group"))
    elif kind == "register":
        _on_register()
    else:
        raise SystemExit(f"fault injection: unknown point {point!r}")


if FAULT:
    _stage, _, _point = FAULT.partition(":")
    if f"cifar10_pipeline.stages.{_stage}" in getattr(sys, "orig_argv", []):
        _install(_stage, _point)
