"""EDM preconditioning with the consistency models' boundary condition (`cm/karras_diffusion.py`).

The denoiser of a distilled (CD) or consistency-trained (CT) model is

    D(x_σ, σ) = c_skip(σ)·x_σ + c_out(σ)·F(c_in(σ)·x_σ, c_noise(σ))

    c_skip(σ) = σ_d² / ((σ − σ_min)² + σ_d²)
    c_out(σ)  = (σ − σ_min)·σ_d / √(σ² + σ_d²)          (σ, not σ − σ_min, under the root)
    c_in(σ)   = 1 / √(σ² + σ_d²)
    c_noise(σ) = 250·ln(σ + 1e-44)                       (1000 · 0.25 · ln σ)

with σ_d = 0.5, σ_min = 0.002 and the data x_0 ∈ [-1, 1] noised as x_σ = x_0 + σ·n (variance
exploding). At σ = σ_min, c_skip = 1 and c_out = 0, so D(x, σ_min) = x exactly: the boundary
condition of a consistency function. (The EDM teachers use c_skip = σ_d²/(σ² + σ_d²) and
c_out = σ·σ_d/√(σ² + σ_d²) instead; these checkpoints need the boundary form.)

Scalings are computed in float64 and cast to float32 right before they multiply a tensor.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0  # Karras grid exponent


def boundary_scalings(
    sigma: np.ndarray | float, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(c_skip, c_out, c_in) of the consistency models at noise level(s) σ > 0, float64 arrays."""
    s = np.asarray(sigma, dtype=np.float64)
    c_skip = sigma_data**2 / ((s - sigma_min) ** 2 + sigma_data**2)
    c_out = (s - sigma_min) * sigma_data / np.sqrt(s**2 + sigma_data**2)
    c_in = 1.0 / np.sqrt(s**2 + sigma_data**2)
    return c_skip, c_out, c_in


def noise_conditioning(sigma: np.ndarray | float) -> np.ndarray:
    """The network's time input c_noise = 250·ln(σ + 1e-44), float64 (≈ −1554 at σ_min, +1096 at σ_max)."""
    return 1000 * 0.25 * np.log(np.asarray(sigma, dtype=np.float64) + 1e-44)


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> np.ndarray:
    """σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ for i = 0..n−1, decreasing, float64."""
    if n < 2:
        raise ValueError(f"karras_sigmas: need n >= 2 noise levels, got {n}")
    u = np.arange(n, dtype=np.float64) / (n - 1)
    return (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


class ConsistencyDenoiser(nn.Module):
    """D(x_σ, σ): the consistency function of a CD/CT checkpoint, x_σ ↦ x̂_0 (not clamped).

    `net` is the raw network F (a `ConsistencyUNet`); `sigma_data`, `sigma_min` and `sigma_max` are the
    constants it was trained with.
    """

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"consistency model config: need 0 < sigma_min ({sigma_min}) < sigma_max ({sigma_max})")
        if sigma_data <= 0:
            raise ValueError(f"consistency model config: sigma_data must be positive, got {sigma_data}")
        self.net = net
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)

    def forward(self, x_t: torch.Tensor, sigma: float | np.ndarray | torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: (B, 3, H, W) = x_0 + σ·n; σ: a float or (B,) levels in [σ_min, σ_max]; y: (B,) labels or None.

        Returns x̂_0, (B, 3, H, W) in x_t's dtype; equal to x_t where σ = σ_min.
        """
        b = x_t.shape[0]
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.detach().cpu().double().numpy()
        s = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (b,))
        s = np.where(np.float32(s) == np.float32(self.sigma_min), self.sigma_min, s)  # a float32 σ_min is σ_min
        if np.any(s < self.sigma_min * (1 - 1e-6)) or np.any(s > self.sigma_max * (1 + 1e-6)) or not np.all(np.isfinite(s)):
            raise ValueError(
                f"ConsistencyDenoiser: sigma must lie in [sigma_min, sigma_max] = [{self.sigma_min}, {self.sigma_max}], "
                f"got {s.min():.6g}..{s.max():.6g}; clip it first"
            )
        c_skip, c_out, c_in = (self._column(c, x_t) for c in boundary_scalings(s, self.sigma_data, self.sigma_min))
        c_noise = torch.as_tensor(noise_conditioning(s), dtype=torch.float32, device=x_t.device)
        out = self.net(c_in * x_t, c_noise, y)[:, : x_t.shape[1]].to(x_t.dtype)  # F
        return c_skip * x_t + c_out * out

    @staticmethod
    def _column(c: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(c, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))


def renoise_std(sigma_next: float, sigma_min: float = SIGMA_MIN) -> float:
    """Std of the noise the CM multistep sampler adds to x̂_0 to reach σ_next: √(σ_next² − σ_min²).

    x̂_0 is treated as already carrying σ_min of noise (the consistency function's boundary).
    """
    return math.sqrt(max(sigma_next**2 - sigma_min**2, 0.0))
