"""2x2 max-pooling for channels-last CUDA activations, as two small Triton kernels.

Why: in an eager gpu_fast step, torch's channels-last max-pool kernels took 24% of the GPU time (the backward
alone 16%): the forward writes an int64 index per output and the backward walks the input through them.
Written for the 2x2 window only, each kernel reads a window once, coalesced along the channels, and the
backward finds the window's maximum again from the saved input instead of reading indices. That makes an
eager gpu_fast step as fast as `torch.compile`'s fused one, without the compile (15-28 s on a fresh machine;
docs/gpu.md has the figures). Everything else (the CPU, other GPUs, other layouts, code being compiled) uses
`F.max_pool2d`.

Same results as `F.max_pool2d(x, 2)`: the output is bit-identical and the gradient goes to the same element
(the first maximum in row-major window order; a NaN counts as the maximum, as in torch). Odd sizes drop the
last row/column, whose gradient is zero.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _kernels():
    """The Triton kernels' launchers, on first use: Triton is imported only when a CUDA pool runs."""
    from cifar10_pipeline.modeling import pooling_kernels

    return pooling_kernels


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = x.shape
        out = torch.empty(
            (n, channels, height // 2, width // 2),
            device=x.device,
            dtype=x.dtype,
            memory_format=torch.channels_last,
        )
        _kernels().pool_forward(x, out)
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, out = ctx.saved_tensors
        grad_in = torch.empty_like(x, memory_format=torch.channels_last)
        # The kernel writes every element of the pooled area; the row/column odd sizes drop gets zero.
        grad_in[:, :, 2 * out.shape[2] :].zero_()
        grad_in[:, :, :, 2 * out.shape[3] :].zero_()
        _kernels().pool_backward(x, out, grad.contiguous(memory_format=torch.channels_last), grad_in)
        return grad_in


@functools.cache
def triton_supports(device: torch.device) -> bool:
    """Triton is installed and the device is an NVIDIA GPU of compute capability 8.0 or newer (bf16 loads).

    Other GPUs (older NVIDIA, ROCm) are untested with these kernels and keep torch's pool.
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.version.cuda is not None and torch.cuda.get_device_capability(device) >= (8, 0)


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``, through the Triton kernels where they apply (eager, CUDA, channels-last)."""
    if (
        x.is_cuda
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.compiler.is_compiling()  # Inductor fuses its own pooling with the batch norm after it
        and triton_supports(x.device)
    ):
        return _MaxPool2x2.apply(x)
    return F.max_pool2d(x, 2)
