"""LDM noise schedule and the latent purification samplers, as DCDP-LDM runs them.

Notation: ᾱ_t = ∏_{s≤t} (1 − β_s), t = 0 … 999 (0-based, as the code indexes it);
z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε.
The schedule is computed in float64; coefficients are cast to float32 right before use. Noising, x̂_0 and
the unclipped DDIM loop are the pixel samplers' (`guided_diffusion.gaussian_diffusion`), given this ᾱ table.

Purification of a latent z at level T (1 ≤ T ≤ 1000), DCDP-LDM (arXiv 2403.06054, official code):
1. noise:   z_T = q_sample(z, T−1) with the image's own generator;
2. denoise: either S = min(T, 20) DDIM steps (eta 0, no clipping) over `latent_ddim_timesteps(S, T)`,
   ending at ᾱ_0 (≈ 0.9985), not at 1 ("DCDP-LDM-I"), or one ε-prediction ẑ_0 at t = T−1 ("DCDP-LDM-II").
"""
from __future__ import annotations

import numpy as np
import torch

from guided_diffusion.gaussian_diffusion import EpsModel, ddim_sample_unclipped, predict_x0, q_sample


def ldm_betas(timesteps: int = 1000, linear_start: float = 0.0015, linear_end: float = 0.0195) -> torch.Tensor:
    """LDM's "linear" schedule, linear in √β: β = linspace(√start, √end, T)², float64 (T,)."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64, device="cpu") ** 2


def schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 12 float64 schedule buffers an LDM checkpoint stores (v_posterior 0), by their checkpoint names."""
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }


def latent_ddim_timesteps(num_steps: int, T: int) -> list[int]:
    """DCDP-LDM's DDIM timesteps: round(linspace(0, 1, S)·(T−2) + 1e-6) + 1, ascending, from 1 to T−1.

    Example: S = 20, T = 400 -> [1, 22, 43, …, 378, 399]. For T ≤ 2 they repeat 1 (a repeated step is an
    identity step), as upstream. numpy's round (half to even) is kept on purpose.
    """
    if num_steps < 1 or T < 1:
        raise ValueError(f"latent_ddim_timesteps: need num_steps >= 1 and T >= 1, got num_steps={num_steps}, T={T}")
    t = np.round(np.linspace(0.0, 1.0, num_steps) * (T - 2) + 1e-6) + 1
    return [int(v) for v in t]


def num_ddim_steps(T: int, ddim_num_iterations: int = 20) -> int:
    """S = min(T, ddim_num_iterations): DCDP-LDM shortens the chain for small noise levels."""
    return min(T, ddim_num_iterations)


def purify_latent(
    eps_model: EpsModel,
    z: torch.Tensor,
    T: int,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    full_ddim: bool = True,
    ddim_num_iterations: int = 20,
) -> torch.Tensor:
    """Noise z (B, C, h, w) to level T with `noise`, then denoise by DDIM or one Tweedie step."""
    if not 1 <= T <= len(alphas_cumprod):
        raise ValueError(f"purify: T_k={T} is outside 1..{len(alphas_cumprod)}; check ddim_init_timestep/ddim_end_timestep")
    z_T = q_sample(z, T - 1, noise, alphas_cumprod)
    if full_ddim:
        steps = latent_ddim_timesteps(num_ddim_steps(T, ddim_num_iterations), T)
        return ddim_sample_unclipped(eps_model, z_T, steps, alphas_cumprod)
    eps = eps_model(z_T, torch.full((z_T.shape[0],), T - 1, dtype=torch.long, device=z_T.device))
    return predict_x0(z_T, eps, T - 1, alphas_cumprod, clip=False)
