"""The DCDP loop: K rounds of (a) data consistency and (b) diffusion purification.

    x ← 0
    for k = 0..K−1:
        x ← τ gradient steps of SGD-momentum on MSE(A(x), y), warm-started at x       (data consistency)
        x ← denoise(q_sample(x, T_k − 1), T_k)                                          (purification)

The functions here return tensors and do no I/O; the driver observes progress through `callback`.
Images are (B, 3, H, W) in [-1, 1]; every image of a batch is independent of the others (losses are
summed over images of per-image means, so each image sees exactly the official gradient).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from . import fast_dc
from .gaussian_diffusion import purification_schedule

if TYPE_CHECKING:  # the protocols the loop works against
    from .measurements import Operator
    from .priors import Prior


OPTIMIZERS = ("SGD", "Adam")
LOSSES = ("L2", "L1")
# Frames the purification may run in, one per round in turn (`purification_transforms`): (quarter turns, flip)
TRANSFORMS = {"none": ((0, False),), "flip": ((0, False), (0, True)),
              "dihedral": tuple((r, f) for f in (False, True) for r in range(4))}


def _to_frame(x: torch.Tensor, frame: tuple) -> torch.Tensor:
    turns, flip = frame
    x = torch.rot90(x, turns, dims=(-2, -1)) if turns else x
    return torch.flip(x, dims=(-1,)) if flip else x


def _from_frame(x: torch.Tensor, frame: tuple) -> torch.Tensor:
    turns, flip = frame
    x = torch.flip(x, dims=(-1,)) if flip else x
    return torch.rot90(x, -turns, dims=(-2, -1)) if turns else x


def _per_image_mean(err: torch.Tensor) -> torch.Tensor:
    """Σ_b mean(err_b): the official `MSELoss()` (mean) for each image, summed over the batch."""
    return err.flatten(1).mean(dim=1).sum()


def data_consistency(
    y: torch.Tensor,
    x_init: torch.Tensor,
    operator,
    steps: int,
    lr: float,
    momentum: float = 0.9,
    optimizer: str = "SGD",
    loss: str = "L2",
    weight_decay_lambda: float = 0.0,
    *,
    operator_state: Optional[dict] = None,
    exact_transpose: bool = False,
    cuda_graph: bool = False,
    history: Optional[list] = None,
) -> torch.Tensor:
    """The official reconstruction phase (`CSGM_Solver_Pixel_Space`) for a batch of images.

    Minimises mean((A(x) − y)²) (or mean|A(x) − y| for loss="L1") + λ·mean((x − x_init)²) over x with a
    fresh optimiser (SGD with momentum, or Adam), `steps` updates, warm-started at `x_init`.
    `operator` is an `Operator` or any callable x -> A(x). With `exact_transpose` (SGD, L2) and an
    operator whose gradient has a closed form (every linear operator: (2/N)·Aᵀ(Ax − y); phase
    retrieval), autograd is replaced by `operator.mse_gradient`, the same numbers without building a
    graph; with `cuda_graph` too, on a CUDA device and without `history`,
    the `steps` updates are captured once in a CUDA graph and replayed (same kernels, one launch).
    `history`, when given, receives x after the first step (the official code saves that iterate too).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optimizer}'; valid: {', '.join(OPTIMIZERS)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss '{loss}'; valid: {', '.join(LOSSES)}")
    state = operator_state or {}
    if exact_transpose and fast_dc.use_closed_form(operator, optimizer, loss):
        if cuda_graph and x_init.is_cuda and history is None and steps > 0:
            return fast_dc.sgd_closed_form_graphed(y, x_init.detach(), operator, state, steps, lr, momentum,
                                                   weight_decay_lambda)
        return fast_dc.sgd_closed_form(y, x_init, operator, state, steps, lr, momentum, weight_decay_lambda, history)

    forward = operator.forward if hasattr(operator, "forward") else operator
    x_start = x_init.detach()
    x = x_start.clone().requires_grad_(True)
    if optimizer == "SGD":
        opt = torch.optim.SGD([x], lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam([x], lr=lr)
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        residual = forward(x, **state) - y
        objective = _per_image_mean(residual.square() if loss == "L2" else residual.abs())
        if weight_decay_lambda:
            objective = objective + weight_decay_lambda * _per_image_mean((x - x_start).square())
        objective.backward()
        opt.step()
        if history is not None and i == 0:
            history.append(x.detach().clone())
    return x.detach()


@dataclass
class DCDPSettings:
    """The DCDP hyper-parameters of a purification config (official names in comments)."""

    K: int                       # total_num_iterations
    tau: int                     # csgm_num_iterations
    lr: float
    T_init: int                  # ddim_init_timestep
    T_end: int = 0               # ddim_end_timestep
    schedule: str = "linear"     # purification_schedule
    optimizer: str = "SGD"
    momentum: float = 0.9
    loss: str = "L2"
    weight_decay_lambda: float = 0.0   # used only when use_weight_decay
    purify: bool = True          # False: data consistency alone (a baseline), same number of steps
    final_tau: Optional[int] = None    # steps of the last round (None: tau)
    final_dc_iterations: int = 0       # data-consistency steps after the last purification (0: none)
    average_last_rounds: int = 1       # output: mean of x over the last m rounds (1: the last x, official)
    purification_transforms: str = "none"   # round k purifies in frame k mod n of TRANSFORMS[...] (none: official)
    exact_transpose: bool = False
    cuda_graphs: bool = False    # with exact_transpose on CUDA: data-consistency steps replayed from a CUDA graph

    def timesteps(self) -> list[int]:
        return purification_schedule(self.K, self.T_init, self.T_end, self.schedule)


@dataclass
class DCDPResult:
    x: torch.Tensor                    # final image (after the last purification), (B, 3, H, W)
    x_before: torch.Tensor             # last data-consistency result (before the last purification)
    nfe: int                           # network evaluations per image
    dc_steps: int                      # data-consistency steps per image
    failed_at: list = field(default_factory=list)   # per image: first outer iteration with a NaN/Inf, or None
    iterates: Optional[list] = None    # with record_iterates: [x after step 1, x after τ, purified x] per round


def run_dcdp(
    y: torch.Tensor,
    operator: "Operator",
    purifier: "Prior",
    settings: DCDPSettings,
    generators: Sequence[torch.Generator],
    x_init: torch.Tensor,
    *,
    operator_state: Optional[dict] = None,
    to_image: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    record_iterates: bool = False,
    check_finite: bool = True,
    callback: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None,
) -> DCDPResult:
    """Run DCDP on a batch. `x_init` is the starting variable (the official code starts from zeros).

    `to_image` maps the optimised variable to an image (a latent prior's decoder; identity for pixel
    priors) and is composed with the operator in the data-consistency phase.
    `callback(k, T_k, x_before, x_after)` is called after every round (for progress and curves).
    With `check_finite`, each round ends with one host synchronisation to record images whose iterate
    became NaN/Inf (they keep running; their neighbours in the batch are unaffected).
    With `settings.final_dc_iterations` n > 0, n more data-consistency steps (same lr, momentum, optimiser,
    loss and flags as the rounds) run from the last purified x after the loop: `x` is their output,
    `x_before` stays the last round's data-consistency iterate, `dc_steps` counts them, `nfe` is unchanged,
    and an image that becomes NaN/Inf there is recorded with `failed_at` = K.
    With `settings.average_last_rounds` m > 1, the output is the mean of x at the end of the last m rounds
    (the purified x; the data-consistency iterate with purification off) instead of the last one alone,
    before any final data-consistency phase; it costs no network evaluation. For a latent prior the mean is
    taken of the optimised latent.
    With `settings.purification_transforms` "flip" or "dihedral", round k purifies x in the k-th (mod 2 or 8)
    frame of TRANSFORMS (x flipped left-right and/or turned by quarter turns, then turned back): the
    prior's errors differ from frame to frame, so the average of the last rounds averages them out too
    (only the augmentations a prior was trained with: flips for priors trained with left-right flips, as
    guided-diffusion's training code does by default; flips and quarter turns for the demo prior). "none" is
    the official purification.
    """
    timesteps = settings.timesteps()
    # the prior's own noise level per round (a consistency model's σ_k); a bare purifier uses T_k itself
    levels = purifier.levels(timesteps) if hasattr(purifier, "levels") else timesteps
    image = to_image or (lambda v: v)
    forward = (lambda v, **s: operator.forward(image(v), **s)) if to_image else operator
    exact = settings.exact_transpose and to_image is None
    B = y.shape[0]
    failed_at: list = [None] * B
    iterates: Optional[list] = [] if record_iterates else None
    nfe = dc_steps = 0
    m = settings.average_last_rounds
    if not 1 <= m <= settings.K:
        raise ValueError(f"average_last_rounds must be between 1 and K = {settings.K}, got {m}")
    if settings.purification_transforms not in TRANSFORMS:
        raise ValueError(f"unknown purification_transforms '{settings.purification_transforms}'; "
                         f"valid: {', '.join(TRANSFORMS)}")
    frames = TRANSFORMS[settings.purification_transforms]
    total: Optional[torch.Tensor] = None   # sum of x over the last m rounds
    x = x_init
    x_before = x
    for k, T_k in enumerate(timesteps):
        steps = settings.final_tau if (settings.final_tau is not None and k == settings.K - 1) else settings.tau
        first: Optional[list] = [] if record_iterates else None
        x = data_consistency(
            y, x, forward, steps, settings.lr, settings.momentum, settings.optimizer, settings.loss,
            settings.weight_decay_lambda, operator_state=operator_state, exact_transpose=exact,
            cuda_graph=settings.cuda_graphs, history=first,
        )
        dc_steps += steps
        x_before = x
        if settings.purify:
            frame = frames[k % len(frames)]
            x = _from_frame(purifier.purify(_to_frame(x, frame), levels[k], generators), frame)
            nfe += purifier.nfe(levels[k])
        if record_iterates:
            iterates.extend([image(v).detach().cpu() for v in (first[0] if first else x_before, x_before, x)])
        if check_finite:
            bad = (~torch.isfinite(x.flatten(1)).all(dim=1)).tolist()
            for b in range(B):
                if bad[b] and failed_at[b] is None:
                    failed_at[b] = k
        if callback is not None:
            callback(k, T_k, x_before, x)
        if m > 1 and k >= settings.K - m:
            total = x.detach().clone() if total is None else total.add_(x.detach())
    if total is not None:
        x = total / m
    if settings.final_dc_iterations > 0:
        # A final data-consistency phase after the last purification (x_before stays the last round's).
        x = data_consistency(
            y, x, forward, settings.final_dc_iterations, settings.lr, settings.momentum, settings.optimizer,
            settings.loss, settings.weight_decay_lambda, operator_state=operator_state, exact_transpose=exact,
            cuda_graph=settings.cuda_graphs,
        )
        dc_steps += settings.final_dc_iterations
        if check_finite:
            bad = (~torch.isfinite(x.flatten(1)).all(dim=1)).tolist()
            for b in range(B):
                if bad[b] and failed_at[b] is None:
                    failed_at[b] = len(timesteps)
    return DCDPResult(
        x=image(x).detach(), x_before=image(x_before).detach(), nfe=nfe, dc_steps=dc_steps,
        failed_at=failed_at, iterates=iterates,
    )
