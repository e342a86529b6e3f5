"""CUDA-graph capture of the training step (``train.cuda_graphs``).

On a GPU the loop records the whole step (forward, backward, optimizer, statistics) once as a CUDA graph and
replays it: per step the CPU only copies the batch in, so a small network is no longer limited by Python and
kernel-launch overhead, and nothing has to be compiled. The optimisers keep their learning rates in device
tensors for it (``make_optimizers(graph_safe=True)``), and the lookahead captures its own pull
(``Lookahead.capture``, training/optim.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Eager steps before capture. One is enough: lazy state (momentum buffers), cuDNN's algorithm choice and any
# compilation all happen on the first call, so the captured second call is the steady state.
GRAPH_WARMUP_STEPS = 1


class CapturedStep:
    """A training step recorded once as a CUDA graph; calling it copies the batch in and replays the graph.

    The step must read its batch from, and only from, the static ``x``/``y`` tensors. The warm-up steps that
    precede the capture change the model and the optimizer; both are put back afterwards, so training starts
    from exactly the state it would have had without the capture.
    """

    def __init__(
        self,
        step: Callable[[torch.Tensor, torch.Tensor], None],
        example_x: torch.Tensor,
        example_y: torch.Tensor,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
    ):
        self.x = example_x.clone().contiguous(memory_format=torch.channels_last)
        self.y = example_y.clone()
        initial_state = {k: v.clone() for k, v in model.state_dict().items()}
        side = torch.cuda.Stream(self.x.device)
        side.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                step(self.x, self.y)
        torch.cuda.current_stream(self.x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step(self.x, self.y)
        with torch.no_grad():
            for key, value in model.state_dict().items():
                value.copy_(initial_state[key])
            # Zeroed momentum / moment estimates and step counts make the next step a first step.
            for optimizer in optimizers:
                for state in optimizer.state.values():
                    for value in state.values():
                        if isinstance(value, torch.Tensor):
                            value.zero_()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
