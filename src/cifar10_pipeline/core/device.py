"""Which device a stage computes on, and how to name it in a record (the CPU's model and vector unit, or the
GPU). torch is imported inside the functions that use it, so reading the CPU's name costs no torch import."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING

from cifar10_pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    import torch


class DeviceError(PipelineError, RuntimeError):
    """A device was asked for that this machine does not have."""


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` (a CUDA GPU when one is visible, else the CPU), ``cpu`` or ``cuda``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"{key} is 'cuda' but no CUDA GPU is visible to torch {torch.__version__}",
            hint=f"set {key}: auto (or cpu), or check CUDA_VISIBLE_DEVICES and the driver (nvidia-smi)",
        )
    return torch.device(name)


def cpu_model_name() -> str:
    """The processor's marketing name (e.g. 'AMD EPYC'), read from /proc/cpuinfo where it exists."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # The vector unit matters as much as the model name: "AMD EPYC" covers AVX2-only and AVX-512 parts.
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model_name()} CPU ({capability}), {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
