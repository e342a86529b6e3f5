"""The Triton 2x2 max-pool must give exactly what F.max_pool2d gives: the same outputs, and each window's
gradient on the same element (the first maximum), ties, NaNs and odd sizes included.

Without a GPU the kernels run in Triton's interpreter (numpy) in a subprocess, which covers their index
arithmetic and tie rule; the interpreter reads bfloat16 as raw integers, so bfloat16 and CUDA graphs are
checked on a GPU only.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from cifar10_pipeline.modeling.pooling import max_pool2x2

from ..conftest import PROJECT_ROOT

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Shapes of the conv net's three pools at a small batch, an even and an odd map, a single row of windows.
SHAPES = [(2, 16, 31, 31), (3, 8, 15, 15), (2, 32, 7, 7), (3, 5, 6, 10), (1, 3, 2, 9)]


def tied_channels_last(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    """Random values rounded to quarters, so that most 2x2 windows hold ties; one NaN in the first image."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(shape, generator=generator) * 2) / 4
    x[0, 0, 0, 1] = float("nan")
    return x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)


def pool_and_grad(pool, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    out = pool(x)
    out.backward(grad_out)
    return out.detach(), x.grad


def test_cpu_tensors_take_torchs_pool() -> None:
    x = tied_channels_last((2, 4, 7, 9), torch.float32, "cpu", seed=0)
    grad_out = torch.randn(2, 4, 3, 4).contiguous(memory_format=torch.channels_last)
    out, grad = pool_and_grad(max_pool2x2, x, grad_out)
    expected_out, expected_grad = pool_and_grad(lambda t: F.max_pool2d(t, 2), x, grad_out)
    assert torch.equal(out.nan_to_num(), expected_out.nan_to_num())
    assert torch.equal(grad, expected_grad)


INTERPRETER_CHECK = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn.functional as F
    from cifar10_pipeline.modeling.pooling import _MaxPool2x2
    from tests.model.test_pooling import SHAPES, pool_and_grad, tied_channels_last

    failures = []
    for index, shape in enumerate(SHAPES):
        for dtype in (torch.float32, torch.float16):
            x = tied_channels_last(shape, dtype, "cpu", seed=index)
            pooled = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
            grad_out = torch.randn(pooled).to(dtype).contiguous(memory_format=torch.channels_last)
            out, grad = pool_and_grad(_MaxPool2x2.apply, x, grad_out)
            expected_out, expected_grad = pool_and_grad(lambda t: F.max_pool2d(t, 2), x, grad_out)
            if not torch.equal(out.nan_to_num(), expected_out.nan_to_num()):
                failures.append(f"{shape} {dtype}: outputs differ")
            if not torch.equal(grad, expected_grad):
                failures.append(f"{shape} {dtype}: {(grad != expected_grad).sum().item()} gradients differ")
            if not grad.is_contiguous(memory_format=torch.channels_last):
                failures.append(f"{shape} {dtype}: gradient not channels-last")
    print("\\n".join(failures) or "identical")
    sys.exit(1 if failures else 0)
    """
)


@pytest.mark.slow
@needs_triton
def test_triton_kernels_match_torch_in_the_interpreter() -> None:
    root = str(PROJECT_ROOT)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([root, *sys.path])}
    command = [sys.executable, "-c", INTERPRETER_CHECK]
    run = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [*SHAPES, (512, 64, 31, 31)])
def test_triton_pool_matches_torch_on_the_gpu(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = tied_channels_last(shape, dtype, "cuda", seed=1)
    pooled = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    grad_out = torch.randn(pooled, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    out, grad = pool_and_grad(max_pool2x2, x, grad_out)
    expected_out, expected_grad = pool_and_grad(lambda t: F.max_pool2d(t, 2), x, grad_out)
    assert torch.equal(out.nan_to_num(), expected_out.nan_to_num())
    assert torch.equal(grad, expected_grad)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert grad.is_contiguous(memory_format=torch.channels_last)


@needs_cuda
def test_triton_pool_replays_in_a_cuda_graph() -> None:
    x = tied_channels_last((64, 32, 15, 15), torch.bfloat16, "cuda", seed=2).requires_grad_()
    grad_out = torch.randn(64, 32, 7, 7, device="cuda", dtype=torch.bfloat16)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles the kernels) off the capture
        max_pool2x2(x).backward(grad_out)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = max_pool2x2(x)
        out.backward(grad_out)
    with torch.no_grad():  # new input, same memory: the replay must see it
        x.copy_(tied_channels_last(tuple(x.shape), torch.bfloat16, "cuda", seed=3))
    x.grad.zero_()
    graph.replay()
    expected_out, expected_grad = pool_and_grad(lambda t: F.max_pool2d(t, 2), x.detach(), grad_out)
    assert torch.equal(out.nan_to_num(), expected_out.nan_to_num())
    assert torch.equal(x.grad, expected_grad)
