"""Consistency-model purification for DCDP: noise the data-consistent x to σ_k, map it back in one step.

    x_σ  = x + σ_k·n                         n ~ N(0, I) from the image's generator (VE noising)
    x̂_0 = clamp(D(x_σ, σ_k), −1, 1)         one consistency step (1 network evaluation)
    for s in s_1 > … > s_m  (cm_multistep = m extra refinements, CM multistep sampling):
        x̂_0 = clamp(D(x̂_0 + √(s² − σ_min²)·n, s), −1, 1)

Noise level σ_k of outer iteration k (`cm_sigma_schedule`):
- `timestep` (default): the level of the pixel code's noising at T_k. It noises with
  x_t = √ᾱ·x + √(1−ᾱ)·ε at index T_k − 1 of the 1000-step linear β schedule, and x_t/√ᾱ = x + σ·ε
  with σ_k = √((1 − ᾱ)/ᾱ), ᾱ = ᾱ_{T_k−1}. So a CM sees the same signal-to-noise ratio as the
  pixel purifier at the same T_k (T 400 → σ 2.03, T 1 → σ 0.01). No T_k = 1 → 2 bump: there is no
  DDIM chain to size.
- `direct`: σ_k = σ_init·(σ_end/σ_init)^(k/(K−1)), a geometric decay over k = 0..K−1 (σ spans
  decades, as on the Karras grid).
`levels(timesteps)` turns the run's schedule into σ_k for every round; `purify(x, σ_k, generators)`.
Both are clipped to [σ_min, σ_max].

Refinement levels s_j (j = 1..m) are the ρ = 7 Karras spacing from σ_k down to σ_min over m + 2
points, without its two ends: s_j = (σ_k^(1/ρ) + j/(m+1)·(σ_min^(1/ρ) − σ_k^(1/ρ)))^ρ.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from guided_diffusion.gaussian_diffusion import ALPHA_BAR, NUM_DIFFUSION_STEPS, randn_per_image
from guided_diffusion.priors import PriorBase, PriorBuild
from util.schema import choice_key, float_key, int_key

from .loading import load_consistency_model, resolve_model_config
from .network import NUM_CLASSES
from .preconditioning import RHO, ConsistencyDenoiser, renoise_std

SIGMA_SCHEDULES = ("timestep", "direct")
CM_OPTION_DEFAULTS = dict(cm_sigma_schedule="timestep", cm_sigma_init=None, cm_sigma_end=None, cm_multistep=0)


def sigma_from_timestep(T_k: int) -> float:
    """σ_k = √((1 − ᾱ)/ᾱ) with ᾱ = ᾱ_{T_k−1} of the 1000-step linear schedule (not clipped), T_k in 1..1000."""
    if isinstance(T_k, bool) or int(T_k) != T_k or not 1 <= T_k <= NUM_DIFFUSION_STEPS:
        raise ValueError(f"purification timestep T_k={T_k!r} must be an integer in [1, {NUM_DIFFUSION_STEPS}]")
    a = ALPHA_BAR[int(T_k) - 1]
    return math.sqrt((1.0 - a) / a)


def direct_sigma(k: int, K: int, sigma_init: float, sigma_end: float) -> float:
    """σ_k = σ_init·(σ_end/σ_init)^(k/(K−1)) for k = 0..K−1 (σ_init when K = 1)."""
    if not 0 <= k < K:
        raise ValueError(f"outer iteration k={k} must be in [0, K) with K={K}")
    u = k / (K - 1) if K > 1 else 0.0
    return sigma_init * (sigma_end / sigma_init) ** u


def refinement_sigmas(sigma: float, m: int, sigma_min: float, rho: float = RHO) -> list[float]:
    """[σ, s_1, …, s_m]: σ, then m levels strictly between σ and σ_min on the ρ-spacing (Karras grid)."""
    u = np.arange(m + 1, dtype=np.float64) / (m + 1)
    s = (sigma ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma ** (1 / rho))) ** rho
    return [float(sigma)] + [float(v) for v in s[1:]]


def _f32(value: float) -> float:
    return float(np.float32(value))


class ConsistencyPurifier(PriorBase):
    """DCDP's purifier backed by a consistency model: `levels(timesteps)` (σ_k per round),
    `purify(x, σ_k, generators)` and `nfe(σ_k)`.

    It is a pixel-space prior in the sense of `guided_diffusion.priors`: `init` gives the official
    zero start and `to_image` is None (the optimised variable is the image).

    model_config: a CM model config (see `loading`); device: where the network runs.
    cm_options (the `cm_*` keys of a purification config):
      cm_sigma_schedule  "timestep" (σ_k from T_k, default) or "direct" (geometric σ_init → σ_end)
      cm_sigma_init      σ at k = 0 (direct only; > 0)
      cm_sigma_end       σ at k = K − 1 (direct only; 0 < σ_end <= σ_init)
      cm_multistep       extra re-noise/denoise refinements per purification (int >= 0, default 0)
    """

    space = "pixel"
    to_image = None
    # purification-config keys read by this prior (checked with the other keys; null: the default)
    OPTIONS = {
        "cm_sigma_schedule": choice_key(SIGMA_SCHEDULES, None, nullable=True),
        "cm_sigma_init": float_key(None, lo=0, lo_open=True, nullable=True),
        "cm_sigma_end": float_key(None, lo=0, lo_open=True, nullable=True),
        "cm_multistep": int_key(None, lo=0, nullable=True),
    }

    def __init__(self, model_config: Mapping, device: str | torch.device = "cpu", **cm_options):
        self.given = {k: v for k, v in cm_options.items() if v is not None}
        self.model_path = model_config.get("model_path")
        self.options = self._check_options(cm_options)
        self.denoiser: ConsistencyDenoiser = load_consistency_model(model_config, device)
        self.device = torch.device(device)
        self.class_label: int | None = resolve_model_config(model_config)["class_label"]

    @classmethod
    def from_config(cls, model_config: dict, build: PriorBuild) -> "ConsistencyPurifier":
        return cls(model_config, build.device, **build.options)

    def describe(self) -> dict:
        suffix = "cm_" + "_".join(f"{v}" for _, v in sorted(self.given.items())) if self.given else "cm"
        return {"kind": "consistency", "model_path": self.model_path, "run_suffix": suffix, "precision": None}

    @staticmethod
    def _check_options(cm_options: Mapping) -> dict:
        unknown = sorted(set(cm_options) - set(CM_OPTION_DEFAULTS))
        if unknown:
            raise ValueError(f"purification config: unknown consistency-model key(s) {unknown}; valid keys are {sorted(CM_OPTION_DEFAULTS)}")
        opts = {**CM_OPTION_DEFAULTS, **{k: v for k, v in cm_options.items() if v is not None}}
        if opts["cm_sigma_schedule"] not in SIGMA_SCHEDULES:
            raise ValueError(
                f"purification config: cm_sigma_schedule '{opts['cm_sigma_schedule']}' is unknown; valid: {', '.join(SIGMA_SCHEDULES)}"
            )
        m = opts["cm_multistep"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"purification config: cm_multistep={m!r} must be an integer >= 0 (extra refinements)")
        if opts["cm_sigma_schedule"] == "direct":
            init, end = opts["cm_sigma_init"], opts["cm_sigma_end"]
            if init is None or end is None or not 0 < float(end) <= float(init):
                raise ValueError(
                    f"purification config: cm_sigma_schedule 'direct' needs 0 < cm_sigma_end <= cm_sigma_init "
                    f"(got cm_sigma_init={init!r}, cm_sigma_end={end!r}); e.g. 2.0 and 0.01"
                )
            opts["cm_sigma_init"], opts["cm_sigma_end"] = float(init), float(end)
        return opts

    def init(self, shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
        """The starting image x = 0, (B, 3, H, W) on the purifier's device."""
        return torch.zeros(tuple(shape), device=self.device)

    def sigma(self, T_k: int, k: int | None = None, K: int | None = None) -> float:
        """σ_k of this purification, clipped to [σ_min, σ_max]."""
        if self.options["cm_sigma_schedule"] == "direct":
            if k is None or K is None:
                raise ValueError("ConsistencyPurifier: cm_sigma_schedule 'direct' needs the outer iteration; call sigma(T_k, k=k, K=K)")
            s = direct_sigma(k, K, self.options["cm_sigma_init"], self.options["cm_sigma_end"])
        else:
            s = sigma_from_timestep(T_k)
        return float(np.clip(s, self.denoiser.sigma_min, self.denoiser.sigma_max))

    def levels(self, timesteps: Sequence[int]) -> list[float]:
        """σ_k of every round k for the run's purification schedule T_0..T_{K−1}, clipped."""
        K = len(timesteps)
        return [self.sigma(T_k, k, K) for k, T_k in enumerate(timesteps)]

    def nfe(self, sigma: float) -> int:
        """Network evaluations per purification: 1 + cm_multistep (whatever the level)."""
        return 1 + self.options["cm_multistep"]

    def class_labels(self, generators: Sequence[torch.Generator]) -> torch.Tensor | None:
        """(B,) int64 labels for a class-conditional model, None otherwise.

        The configured `class_label`, or for `null` one label per image drawn uniformly from
        [0, 999] by a fresh generator seeded with the image generator's initial seed: the label is
        fixed for the image across outer iterations and does not consume the image's noise stream.
        """
        if self.denoiser.net.num_classes is None:
            return None
        if self.class_label is not None:
            labels = [int(self.class_label)] * len(generators)
        else:
            labels = [
                int(torch.randint(NUM_CLASSES, (1,), generator=torch.Generator().manual_seed(g.initial_seed())))
                for g in generators
            ]
        return torch.tensor(labels, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def purify(self, x: torch.Tensor, sigma: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Purify x: (B, 3, H, W) (the data-consistency iterate, any range) → (B, 3, H, W) in [-1, 1].

        sigma: σ_k of this round (`levels`; `sigma(T_k)` for one timestep). Image b's noise comes from
        generators[b] (CPU draws, moved to x's device), so results do not depend on the batch.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ConsistencyPurifier.purify: x must be (B, 3, H, W), got {tuple(x.shape)}")
        x = x.detach().to(self.device, torch.float32)
        y = self.class_labels(generators)
        sigmas = refinement_sigmas(float(sigma), self.options["cm_multistep"], self.denoiser.sigma_min)
        x_t = x + _f32(sigmas[0]) * randn_per_image(x.shape, generators, x.device)  # x_σ = x + σ_k·n
        x0 = self.denoiser(x_t, sigmas[0], y).clamp(-1.0, 1.0)  # one consistency step
        for s in sigmas[1:]:  # CM multistep: re-noise x̂_0 to s, map back
            x_t = x0 + _f32(renoise_std(s, self.denoiser.sigma_min)) * randn_per_image(x.shape, generators, x.device)
            x0 = self.denoiser(x_t, s, y).clamp(-1.0, 1.0)
        return x0
