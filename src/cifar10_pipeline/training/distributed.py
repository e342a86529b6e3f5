"""Training on several processes with torchrun and DistributedDataParallel (NCCL on GPUs, gloo on CPUs).

torchrun starts one process per GPU (or per CPU share) and tells each who it is through its standard
environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE): that protocol is torch's, not a setting of ours.
``train.nproc`` in params.yaml says how many processes a plain ``dvc repro`` starts on one machine; the train
stage then replaces itself with ``torchrun --standalone --nproc-per-node N`` (see ``exec_torchrun``). For
several machines, start torchrun yourself on each (README, "Several processes and machines"); the stage
sees WORLD_SIZE and joins the job instead of launching one.

Every rank holds the whole (small) training set and draws the same augmentation and order from the same
seed; each global batch of ``train.batch_size`` images is cut into one shard per rank, and DDP averages the
gradients. Only rank 0 evaluates, writes outputs, logs to MLflow and runs codecarbon.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cifar10_pipeline.core.device import DeviceError
from cifar10_pipeline.core.params import ParamsError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job (a single process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launched: bool = False  # started by torchrun (or another launcher speaking its protocol)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (the batch size divides by the world size)."""
        size = len(batch) // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]


def from_environment() -> Ranks:
    """The ranks torchrun gave this process, or a single process when it was started without torchrun."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return Ranks()
    world = int(env["WORLD_SIZE"])
    return Ranks(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=world,
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
        launched=True,
    )


def exec_torchrun(module: str, nproc: int) -> None:
    """Replace this process with torchrun running ``python -m module`` on ``nproc`` local processes.

    exec, not a child: DVC's Ctrl-C and SIGTERM reach torchrun's agent directly, which stops every worker,
    and the stage's exit status is the job's.
    """
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    print(f"train: train.nproc={nproc}: starting {nproc} processes with torchrun", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [*args, "-m", module, *sys.argv[1:]])


def check_batch_split(batch_size: int, world_size: int) -> None:
    """Each rank trains on an equal shard of the global batch, so the processes must divide it."""
    if batch_size % world_size:
        raise ParamsError(
            f"train.batch_size ({batch_size}) is the global batch and must divide evenly between the "
            f"{world_size} processes (train.nproc or torchrun's process count)",
            hint=f"set train.batch_size to a multiple of {world_size}, or change train.nproc",
        )


def check_gpus(device: torch.device, local_processes: int) -> None:
    """One GPU per local process: refuse more processes than this machine has GPUs."""
    if device.type == "cuda" and local_processes > (count := torch.cuda.device_count()):
        raise DeviceError(
            f"{local_processes} processes on this machine need one GPU each, but it has {count}",
            hint=f"set train.nproc (or torchrun's --nproc-per-node) to {count} or fewer",
        )


def device_for(ranks: Ranks, device: torch.device) -> torch.device:
    """Each rank on a machine takes its own GPU; CPU ranks share the cores between them."""
    if device.type == "cuda":
        check_gpus(device, ranks.local_rank + 1)
        return torch.device("cuda", ranks.local_rank)
    if ranks.launched and ranks.local_world_size > 1:
        # torchrun sets OMP_NUM_THREADS=1 for every worker; give each its share of the cores instead.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.local_world_size))
    return device


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join the job's process group (a no-op for a single process); leave it on the way out."""
    if not ranks.distributed:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum the tensors over every rank in place (nothing to do for one process)."""
    if dist.is_available() and dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
