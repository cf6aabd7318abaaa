"""The diffusion side of DCDP: the 1000-step linear schedule, the purification schedules, forward
noising and the two denoisers (full DDIM and one-step Tweedie), exactly as the official code runs them.

Legend (paper → code): T_k → `T_k`, ᾱ_t → `alpha_bar[t]`, x̂_0 → `x0_hat`, ε̂ → `eps`.
A timestep `t` is always an integer index 0..999 into the 1000-step arrays (t = 0 is the least noisy).
Coefficients are computed in float64 and cast to float32 only when they multiply a tensor.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from util.noise import randn_per_image  # noqa: F401  (re-exported: the samplers' noise)

NUM_DIFFUSION_STEPS = 1000

# A denoising network: model(x (B,3,H,W), t (B,) int64) -> (B, C>=3, H, W) whose first 3 channels are ε̂.
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(num_steps: int = NUM_DIFFUSION_STEPS) -> np.ndarray:
    """β_t of the guided-diffusion "linear" schedule, float64 (1e-4 → 0.02 for 1000 steps)."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


ALPHA_BAR: np.ndarray = np.cumprod(1.0 - linear_betas())  # ᾱ_t, float64, shape (1000,)


# ---------------------------------------------------------------------------------------------
# Purification schedules: T_k for k = 0..K-1
# ---------------------------------------------------------------------------------------------

def _linear(u: np.ndarray, span: int, T_end: int) -> np.ndarray:
    return (np.round(u * span + 1e-6) + T_end)[::-1]


def _cosine(u: np.ndarray, span: int, T_end: int) -> np.ndarray:
    return np.round(np.cos(u * np.pi / 2) ** 2 * span) + T_end


def _bias_t1(u: np.ndarray, span: int, T_end: int) -> np.ndarray:
    return (np.round(np.sin(u * np.pi / 2) * span) + T_end)[::-1]


def _bias_t0(u: np.ndarray, span: int, T_end: int) -> np.ndarray:
    return (np.round((np.sin((u - 1) * np.pi / 2) + 1) * span) + T_end)[::-1]


def _no_zero(ts: np.ndarray) -> np.ndarray:
    ts = ts.copy()
    ts[ts == 0] = 1
    return ts


def _reverse_cosine(u: np.ndarray, span: int, T_end: int) -> np.ndarray:
    return 2 * _no_zero(_linear(u, span, T_end)) - _no_zero(_cosine(u, span, T_end))


_SCHEDULES = {
    "linear": _linear,
    "cosine": _cosine,
    "bias_t1": _bias_t1,
    "bias_t0": _bias_t0,
    "reverse_cosine": _reverse_cosine,
}
SCHEDULE_KINDS = ("linear", "constant", "cosine", "bias_t1", "bias_t0", "reverse_cosine")


def purification_schedule(K: int, T_init: int, T_end: int = 0, kind: str = "linear") -> list[int]:
    """The purification timesteps T_0..T_{K-1} of the official `Purification_Schedule`.

    linear: reverse(round(u·(T_init−T_end) + 1e-6) + T_end) with u = linspace(0, 1, K); the other
    kinds are in `upstream-dcdp.md` §2.3. Every kind but `constant` then replaces 0 by 1.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown purification_schedule '{kind}'; valid kinds: {', '.join(SCHEDULE_KINDS)}")
    if K < 1 or K > T_init:
        raise ValueError(f"total_num_iterations K={K} must be between 1 and ddim_init_timestep={T_init}")
    if not 0 <= T_end <= T_init <= NUM_DIFFUSION_STEPS:
        raise ValueError(
            f"need 0 <= ddim_end_timestep ({T_end}) <= ddim_init_timestep ({T_init}) <= {NUM_DIFFUSION_STEPS}"
        )
    if kind == "constant":
        return [int(T_init)] * K
    u = np.linspace(0, 1, K)
    ts = _no_zero(_SCHEDULES[kind](u, T_init - T_end, T_end))
    return [int(t) for t in ts]


# ---------------------------------------------------------------------------------------------
# DDIM timesteps, as dcdp.py builds its truncated, respaced sampler
# ---------------------------------------------------------------------------------------------

def ddim_num_steps(T_k: int) -> int:
    """Length of the truncated chain the official code builds for T_k (T_k = 1 is bumped to 2)."""
    return max(int(T_k), 2)


def ddim_timesteps(T_k: int, n: int = 20) -> list[int]:
    """Original timesteps kept by the official DDIM purification for T_k, ascending.

    The chain 0..S−1 (S = max(T_k, 2)) is respaced to min(S, n) steps: round(j·(S−1)/(m−1)),
    accumulated as a float stride with Python's round, like guided-diffusion's `space_timesteps`.
    """
    S = ddim_num_steps(T_k)
    m = min(S, int(n))
    if m < 2:
        raise ValueError(f"ddim_num_iterations must be at least 2, got {n}")
    stride = (S - 1) / (m - 1)
    cur, kept = 0.0, []
    for _ in range(m):
        kept.append(round(cur))
        cur += stride
    return kept


# ---------------------------------------------------------------------------------------------
# Forward noising and the two denoisers
# ---------------------------------------------------------------------------------------------

def _coef(value: float, like: torch.Tensor) -> float:
    """A float64 coefficient rounded to float32, as the reference casts it before multiplying."""
    return float(np.float32(value)) if like.dtype == torch.float32 else float(value)


def q_sample(x0: torch.Tensor, t, noise: torch.Tensor, alpha_bar=ALPHA_BAR) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε   (DDPM eq. 4), t an integer index into the float64 ᾱ table.

    `alpha_bar`: the 1000-step linear table by default; a latent model passes its own. `t` may also be a
    (B,) int64 tensor, one timestep per image (training), each coefficient cast to float32 per image as
    guided-diffusion's `_extract_into_tensor` does.
    """
    if isinstance(t, torch.Tensor):
        a = torch.as_tensor(alpha_bar, dtype=torch.float64)[t.cpu()].view(-1, *([1] * (x0.dim() - 1)))
        return (a.sqrt().to(x0.dtype).to(x0.device) * x0 + (1.0 - a).sqrt().to(x0.dtype).to(x0.device) * noise)
    a = float(alpha_bar[int(t)])
    return _coef(math.sqrt(a), x0) * x0 + _coef(math.sqrt(1.0 - a), x0) * noise


def _eps(model: EpsModel, x: torch.Tensor, t: int) -> torch.Tensor:
    t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    return model(x, t_batch)[:, :3].to(x.dtype)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, t: int, alpha_bar=ALPHA_BAR, clip: bool = True) -> torch.Tensor:
    """x̂_0 = sqrt(1/ᾱ_t)·x_t − sqrt(1/ᾱ_t − 1)·ε̂ (Tweedie's estimate for an ε-model), clipped to [-1, 1]
    (clip_denoised=True) unless `clip` is False (latents are not clipped)."""
    a = float(alpha_bar[int(t)])
    x0 = _coef(math.sqrt(1.0 / a), x_t) * x_t - _coef(math.sqrt(1.0 / a - 1.0), x_t) * eps
    return x0.clamp(-1.0, 1.0) if clip else x0


@torch.no_grad()
def ddim_denoise(model: EpsModel, x_t: torch.Tensor, T_k: int, n: int = 20) -> torch.Tensor:
    """Full-DDIM purification (η = 0) of x_t, noised at timestep T_k − 1, back to t = 0.

    x_t: (B, 3, H, W). Visits `ddim_timesteps(T_k, n)` from the top down; returns x̂_0 of the last
    step, in [-1, 1]. With the official T_k = 1 quirk, the chain is {0, 1} and starts at t = 1.
    """
    kept = ddim_timesteps(T_k, n)
    x = x_t
    for i in range(len(kept) - 1, -1, -1):
        t = kept[i]
        a = ALPHA_BAR[t]
        a_prev = ALPHA_BAR[kept[i - 1]] if i > 0 else 1.0
        eps = _eps(model, x, t)                                   # 1. ε̂ = ε_θ(x_t, t)
        x0_hat = predict_x0(x, eps, t)                            # 2. x̂_0, clipped
        eps = (_coef(math.sqrt(1.0 / a), x) * x - x0_hat) / _coef(math.sqrt(1.0 / a - 1.0), x)  # 3. ε from clipped x̂_0
        x = _coef(math.sqrt(a_prev), x) * x0_hat + _coef(math.sqrt(1.0 - a_prev), x) * eps     # 4. DDIM step, η = 0
    return x


@torch.no_grad()
def tweedie_denoise(model: EpsModel, x_t: torch.Tensor, T_k: int) -> torch.Tensor:
    """One-step Tweedie purification: x̂_0 at t = max(T_k, 2) − 1, clipped to [-1, 1]."""
    t = ddim_num_steps(T_k) - 1
    return predict_x0(x_t, _eps(model, x_t, t), t)


def ddim_nfe(T_k: int, n: int = 20) -> int:
    """UNet evaluations of one full-DDIM purification at T_k."""
    return len(ddim_timesteps(T_k, n))


def ddim_sample_unclipped(eps_model: EpsModel, x_T: torch.Tensor, timesteps: Sequence[int], alpha_bar) -> torch.Tensor:
    """Deterministic DDIM (η = 0) without clipping, as latent diffusion runs it: from x_T at ᾱ[timesteps[-1]]
    down to ᾱ[timesteps[0] − 1] (not to ᾱ = 1), with x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t (LDM's arithmetic).

    Legend: a_t = ᾱ_{τ_i}, a_prev = ᾱ_{τ_{i−1}} (ᾱ_{τ_0 − 1} for the last step), ε̂ = eps_model(x, τ_i).
    """
    x = x_T
    for i in reversed(range(len(timesteps))):
        t = timesteps[i]
        a_t = float(alpha_bar[t])
        a_prev = float(alpha_bar[timesteps[i - 1] if i > 0 else timesteps[0] - 1])
        eps = eps_model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))   # 1. ε̂
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)                                   # 2. x̂_0, no clipping
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps                                # 3. DDIM eq. 12, σ = 0
    return x
