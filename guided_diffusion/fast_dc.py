"""The fast data-consistency path: SGD-momentum steps with the operator's closed-form gradient, no
autograd graph, optionally captured once in a CUDA graph and replayed.

`data_consistency` (solver.py) comes here when `exact_transpose` holds and `use_closed_form` says the
numbers are the same: SGD on the L2 loss with an operator whose `mse_gradient` is exact. The CUDA
graphs are cached here, per operator (weakly: an operator that is dropped takes its graphs with it),
one per step count, hyper-parameters, tensor shapes, dtype and device.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Optional

import torch

log = logging.getLogger("dcdp")

# operator -> {key: CudaGraphSGD, or the capture error's message when the capture failed}
_GRAPHS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def use_closed_form(operator, optimizer: str, loss: str) -> bool:
    """SGD on the L2 loss with an operator whose gradient has a closed form (`Operator.mse_gradient`)."""
    closed = getattr(operator, "closed_form_gradient", getattr(operator, "is_linear", False))
    return bool(closed) and hasattr(operator, "mse_gradient") and optimizer == "SGD" and loss == "L2"


def _sgd_step(x, buf, x_init, y, operator, state, lr, momentum, prox) -> None:
    """One in-place SGD-momentum step on x with the closed-form gradient g = (2/N)·Aᵀ(Ax − y) (or the
    operator's own `mse_gradient`) + prox·(x − x_init).

    torch semantics: buf₁ = g₁, buf_k = μ·buf_{k−1} + g_k, x ← x − lr·buf. `buf` starts at zeros, which
    makes the first step μ·0 + g₁ = g₁ exactly, so every step is the same sequence of kernels (what a
    CUDA graph needs)."""
    g = operator.mse_gradient(x, y, **state)
    if prox:
        g.add_(x - x_init, alpha=prox)
    buf.mul_(momentum).add_(g)
    x.sub_(buf, alpha=lr)


@torch.no_grad()
def sgd_closed_form(y, x_init, operator, state, steps, lr, momentum, lam, history) -> torch.Tensor:
    """SGD with momentum using the closed-form gradient of the per-image mean squared error
    (`operator.mse_gradient`; (2/N)·Aᵀ(Ax − y) for a linear operator, N = numel(y_b))."""
    prox = 2.0 * lam / x_init[0].numel()
    x = x_init.clone()
    buf = torch.zeros_like(x)
    for i in range(steps):
        _sgd_step(x, buf, x_init, y, operator, state, lr, momentum, prox)
        if history is not None and i == 0:
            history.append(x.clone())
    return x


class CudaGraphSGD:
    """`steps` closed-form-gradient SGD steps (as `_sgd_closed_form`) captured once in a CUDA graph and replayed.

    The graph reads its inputs from static buffers, so one capture serves every call with the same
    shapes and hyper-parameters (`run` copies the new y, x_init and state in). `warm_up` runs two steps
    first (on a side stream on CUDA), which builds the operator's caches (resize matrices, kernel
    spectra) and the cuFFT/cuBLAS handles, as CUDA graphs require; `capture` then records the steps.
    Everything runs under the buffers' device (it need not be the current one: torchrun ranks).
    """

    def __init__(self, operator, y, x_init, state, steps, lr, momentum, lam):
        self.operator, self.steps = operator, steps
        self.hyper = (lr, momentum, 2.0 * lam / x_init[0].numel())
        self.y, self.x_init, self.x = y.clone(), x_init.clone(), x_init.clone()
        self.buf = torch.zeros_like(x_init)
        self.state = {k: v.clone() for k, v in state.items()}
        self.device = x_init.device
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def _step(self) -> None:
        lr, momentum, prox = self.hyper
        _sgd_step(self.x, self.buf, self.x_init, self.y, self.operator, self.state, lr, momentum, prox)

    def _on_device(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @torch.no_grad()
    def warm_up(self) -> None:
        """Two steps outside the graph; an error here is the operator's own and propagates."""
        if self.device.type != "cuda":
            for _ in range(2):
                self._step()
            return
        with self._on_device():
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)

    @torch.no_grad()
    def capture(self) -> None:
        with self._on_device():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                for _ in range(self.steps):
                    self._step()
        self.graph = graph

    def run(self, y: torch.Tensor, x_init: torch.Tensor, state: dict) -> torch.Tensor:
        with self._on_device():
            self.y.copy_(y)
            self.x_init.copy_(x_init)
            self.x.copy_(x_init)
            self.buf.zero_()
            for k, v in state.items():
                self.state[k].copy_(v)
            self.graph.replay()
            return self.x.clone()


def sgd_closed_form_graphed(y, x_init, operator, state, steps, lr, momentum, lam) -> torch.Tensor:
    """`_sgd_closed_form` through a CUDA graph cached per operator (one per shapes and hyper-parameters).

    If the capture itself fails (an operator that cannot be captured, a driver problem), one warning
    names the error and these steps run eagerly from then on: the same numbers, without the graph.
    Errors of the operator (in the warm-up steps) and running out of GPU memory propagate as usual.
    """
    key = (steps, lr, momentum, lam, tuple(y.shape), y.dtype, tuple(x_init.shape), x_init.dtype, x_init.device,
           tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(state.items())))
    cache = _GRAPHS.setdefault(operator, {})
    if key not in cache:
        graphed = CudaGraphSGD(operator, y, x_init, state, steps, lr, momentum, lam)
        graphed.warm_up()
        try:
            graphed.capture()
            graphed.operator = None  # replays need only the buffers; the cache must not keep its key alive
            cache[key] = graphed
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any capture failure: keep going without the graph
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning(f"warning: CUDA graph capture of the data-consistency steps failed ({message}); "
                        f"running them without the graph")
            cache[key] = message
    if isinstance(cache[key], str):
        return sgd_closed_form(y, x_init, operator, state, steps, lr, momentum, lam, None)
    return cache[key].run(y, x_init, state)


def cuda_graph_failures(operator) -> list[str]:
    """The capture errors recorded on `operator` (empty when every capture worked or none was tried)."""
    return [v for v in _GRAPHS.get(operator, {}).values() if isinstance(v, str)]


def cached_graphs(operator) -> int:
    """How many captured CUDA graphs are cached for `operator`."""
    return sum(not isinstance(v, str) for v in _GRAPHS.get(operator, {}).values())
