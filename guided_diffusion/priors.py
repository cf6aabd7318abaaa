"""Priors for the purification phase, one object per kind of model.

Every prior offers the same small interface to the DCDP loop:
    init(shape, generators) -> v      the starting variable (zeros, as the official code)
    to_image: None or v -> image      None when the variable is the image itself
    purify(v, T_k, generators, k, K)  noise to level T_k, denoise
    nfe(T_k) -> int                   network evaluations of one purification
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional, Sequence

import torch

from .gaussian_diffusion import ddim_denoise, ddim_nfe, q_sample, randn_per_image, tweedie_denoise

log = logging.getLogger("dcdp")

PRIOR_KINDS = ("pixel", "latent", "consistency")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(device: torch.device, precision: str) -> str:
    """The network precision a setting means on `device`: `auto` is the official behaviour, fp16 autocast
    on CUDA (dcdp.py wraps purification in `torch.cuda.amp.autocast()`), plain fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str):
    """Mixed precision for the network only (see `resolve_precision`)."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class PixelPrior:
    """A guided-diffusion ε-model in pixel space, purifying with full DDIM or one Tweedie step."""

    space = "pixel"
    to_image = None

    def __init__(self, model: torch.nn.Module, *, full_ddim: bool = True, ddim_num_iterations: int = 20,
                 precision: str = "auto", device: torch.device | str = "cpu"):
        self.model = model
        self.full_ddim = full_ddim
        self.n = int(ddim_num_iterations)
        self.device = torch.device(device)
        self.precision = precision
        autocast_context(self.device, precision)  # validate early

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (the UNet's downsampling factor)."""
        model = getattr(self.model, "_orig_mod", self.model)  # a torch.compile wrapper
        return int(getattr(model, "downsample_factor", 1))

    def init(self, shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
        return torch.zeros(tuple(shape), device=self.device)

    def _eps_model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.device, self.precision):
            return self.model(x, t)

    @torch.no_grad()
    def purify(self, x: torch.Tensor, T_k: int, generators: Sequence[torch.Generator], k: int = 0, K: int = 1) -> torch.Tensor:
        noise = randn_per_image(x.shape, generators, x.device, x.dtype)
        x_t = q_sample(x, T_k - 1, noise)               # noised at the original index T_k − 1
        if self.full_ddim:
            return ddim_denoise(self._eps_model, x_t, T_k, self.n)
        return tweedie_denoise(self._eps_model, x_t, T_k)

    def nfe(self, T_k: int) -> int:
        return ddim_nfe(T_k, self.n) if self.full_ddim else 1


def build_prior(model_config: dict, *, full_ddim: bool, ddim_num_iterations: int, device: torch.device,
                precision: str = "auto", compile_model: bool | str = False, channels_last: bool = False,
                purification: Optional[dict] = None):
    """Build the prior a model config describes (`kind`: pixel (default), latent, consistency).

    Returns (prior, info) where info records the checkpoint path and whether weights are random.
    """
    cfg = dict(model_config)
    kind = cfg.pop("kind", "pixel")
    if kind not in PRIOR_KINDS:
        raise ValueError(f"unknown model kind '{kind}'; valid kinds: {', '.join(PRIOR_KINDS)}")
    purification = purification or {}
    if kind == "pixel":
        from .unet import create_model

        model = create_model(**cfg).to(device)
        model.eval().requires_grad_(False)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compile_model:  # True, or a torch.compile mode ("reduce-overhead" captures CUDA graphs)
            model = torch.compile(model, mode=None if compile_model is True else compile_model)
        prior = PixelPrior(model, full_ddim=full_ddim, ddim_num_iterations=ddim_num_iterations,
                           precision=precision, device=device)
        return prior, {"kind": kind, "model_path": cfg.get("model_path")}
    if kind == "latent":
        from latent_diffusion import LatentPrior

        prior = LatentPrior(cfg, device, data_consistency_type=purification.get("data_consistency_type", "pixel"),
                            full_ddim=full_ddim, ddim_num_iterations=ddim_num_iterations)
        return prior, {"kind": kind, "model_path": cfg.get("model_path"), "run_suffix": f"latent_{prior.space}"}
    from consistency_models import ConsistencyPurifier

    cm_options = {k: v for k, v in purification.items() if k.startswith("cm_")}
    prior = ConsistencyPurifier(cfg, device, **cm_options)
    suffix = "cm_" + "_".join(f"{v}" for k, v in sorted(cm_options.items())) if cm_options else "cm"
    return prior, {"kind": kind, "model_path": cfg.get("model_path"), "run_suffix": suffix}
