"""Triton kernels behind ``pooling.max_pool2x2``; importing this module needs Triton (CUDA builds of torch).

The tensors are channels-last, i.e. (N, H, W, C) in memory; ``offs`` index the pooled (N, h, w, C) output,
so neighbouring lanes read neighbouring channels (coalesced loads and stores).
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024  # output elements per program: 4 windows of 256 channels, or 16 of 64


@triton.jit
def _top_left(offs, channels, out_w, out_h, in_w, in_h):
    """Input offset of the window's top-left element (n, 2i, 2j, c) for the output element (n, i, j, c)."""
    c = offs % channels
    rest = offs // channels
    j = rest % out_w
    rest = rest // out_w
    i = rest % out_h
    n = rest // out_h
    return ((n * in_h + 2 * i) * in_w + 2 * j) * channels + c


@triton.jit
def _is_max(value, maximum):
    return (value == maximum) | ((value != value) & (maximum != maximum))  # a NaN maximum matches a NaN


@triton.jit
def forward_kernel(x_ptr, out_ptr, total, channels, out_w, out_h, in_w, in_h, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    top_left = _top_left(offs, channels, out_w, out_h, in_w, in_h)
    below = in_w * channels
    m = tl.load(x_ptr + top_left, mask=mask)
    # Strictly greater (or NaN) replaces: the first maximum in row-major order wins, as in torch's kernels.
    for step in tl.static_range(1, 4):
        value = tl.load(x_ptr + top_left + (step // 2) * below + (step % 2) * channels, mask=mask)
        m = tl.where((value > m) | (value != value), value, m)
    tl.store(out_ptr + offs, m, mask=mask)


@triton.jit
def backward_kernel(
    x_ptr, out_ptr, grad_ptr, grad_in_ptr, total, channels, out_w, out_h, in_w, in_h, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    top_left = _top_left(offs, channels, out_w, out_h, in_w, in_h)
    below = in_w * channels
    m = tl.load(out_ptr + offs, mask=mask)
    g = tl.load(grad_ptr + offs, mask=mask)
    zero = tl.zeros_like(g)
    # The first element of the window equal to its maximum takes the gradient (the one torch's index names).
    taken = offs < 0  # all False
    for step in tl.static_range(0, 3):
        where = top_left + (step // 2) * below + (step % 2) * channels
        take = ~taken & _is_max(tl.load(x_ptr + where, mask=mask), m)
        tl.store(grad_in_ptr + where, tl.where(take, g, zero), mask=mask)
        taken = taken | take
    tl.store(grad_in_ptr + top_left + below + channels, tl.where(taken, zero, g), mask=mask)


def _launch(kernel, x: torch.Tensor, out: torch.Tensor, *tensors: torch.Tensor) -> None:
    """Run ``kernel`` over the pooled output ``out`` of the channels-last ``x``."""
    n, channels, in_h, in_w = x.shape
    out_h, out_w = out.shape[2], out.shape[3]
    total = n * channels * out_h * out_w
    if total:
        grid = (triton.cdiv(total, BLOCK),)
        kernel[grid](x, out, *tensors, total, channels, out_w, out_h, in_w, in_h, BLOCK=BLOCK)


def pool_forward(x: torch.Tensor, out: torch.Tensor) -> None:
    """Write the 2x2 maxima of ``x`` into ``out``."""
    _launch(forward_kernel, x, out)


def pool_backward(x: torch.Tensor, out: torch.Tensor, grad: torch.Tensor, grad_in: torch.Tensor) -> None:
    """Write ``grad`` to each window's first maximum in ``grad_in``, zero to its other elements."""
    _launch(backward_kernel, x, out, grad, grad_in)
