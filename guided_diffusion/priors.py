"""Priors for the purification phase: the `Prior` protocol, the registry of prior kinds and the pixel prior.

Every prior offers the DCDP loop (`solver.run_dcdp`) the same small interface:
    init(shape, generators) -> v      the starting variable (zeros, as the official code)
    to_image: None or v -> image      None when the variable is the image itself
    levels(timesteps) -> levels       the schedule T_0..T_{K-1} as this prior's noise levels (default: itself)
    purify(v, level, generators)      noise to that level, denoise
    nfe(level) -> int                 network evaluations of one purification
    describe() -> dict                kind, checkpoint, folder-name suffix and the settings that change numbers
A prior kind is a line of `PRIORS` ("kind": "package.module:Class", imported when first used); the class
declares the purification-config keys it reads (`OPTIONS`, checked by the config loader with the other
keys) and builds itself from a model config (`from_config`).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Protocol, Sequence

import torch

from util.errors import DCDPError
from util.registry import Registry
from util.schema import Key

from .gaussian_diffusion import ddim_denoise, ddim_nfe, q_sample, randn_per_image, tweedie_denoise

log = logging.getLogger("dcdp")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

PRIORS = Registry("prior", lazy={
    "pixel": "guided_diffusion.priors:PixelPrior",
    "latent": "latent_diffusion.prior:LatentPrior",
    "consistency": "consistency_models.purifier:ConsistencyPurifier",
})


@dataclass(frozen=True)
class PriorBuild:
    """How the run wants its prior built (a prior uses what applies to it)."""

    device: torch.device
    full_ddim: bool = True
    ddim_num_iterations: int = 20
    precision: str = "auto"
    compile_model: bool | str = False
    channels_last: bool = False
    options: dict = field(default_factory=dict)   # this prior's OPTIONS keys that the purification config sets


class Prior(Protocol):
    OPTIONS: ClassVar[dict[str, Key]]
    space: str                                              # what data consistency optimises: "pixel" or "latent"
    to_image: Optional[Callable[[torch.Tensor], torch.Tensor]]

    @classmethod
    def from_config(cls, model_config: dict, build: PriorBuild) -> "Prior": ...

    def init(self, shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor: ...

    def levels(self, timesteps: Sequence[int]) -> list: ...

    def purify(self, v: torch.Tensor, level, generators: Sequence[torch.Generator]) -> torch.Tensor: ...

    def nfe(self, level) -> int: ...

    def describe(self) -> dict: ...


class PriorBase:
    """Defaults of the protocol: no options of its own, the schedule's T_k as noise levels."""

    OPTIONS: ClassVar[dict[str, Key]] = {}

    def levels(self, timesteps: Sequence[int]) -> list:
        return list(timesteps)


def prior_options_schema() -> dict[str, Key]:
    """The purification-config keys that some prior reads, each with its check (every kind's; a key set for
    another kind than the run's is accepted and unused)."""
    schema: dict[str, Key] = {}
    for kind in PRIORS:
        schema.update(PRIORS[kind].OPTIONS)
    return schema


def build_prior(model_config: dict, *, full_ddim: bool, ddim_num_iterations: int, device: torch.device,
                precision: str = "auto", compile_model: bool | str = False, channels_last: bool = False,
                purification: Optional[dict] = None):
    """Build the prior a model config describes (`kind`: a name of `PRIORS`, pixel by default).

    `purification` holds the prior options the purification config sets. Returns (prior, prior.describe()).
    """
    cfg = dict(model_config)
    kind = cfg.pop("kind", "pixel")
    if kind not in PRIORS:
        raise ValueError(f"unknown model kind '{kind}'; valid kinds: {', '.join(PRIORS)}")
    cls = PRIORS[kind]
    options = {k: v for k, v in (purification or {}).items() if k in cls.OPTIONS and v is not None}
    build = PriorBuild(device=torch.device(device), full_ddim=full_ddim, ddim_num_iterations=ddim_num_iterations,
                       precision=precision, compile_model=compile_model, channels_last=channels_last, options=options)
    prior = cls.from_config(cfg, build)
    return prior, prior.describe()


# ---------------------------------------------------------------------------------------------
# The pixel prior: a guided-diffusion ε-model
# ---------------------------------------------------------------------------------------------

class CompileError(DCDPError):
    """The torch.compile'd network failed where the uncompiled one runs: the compiler toolchain is broken."""

    def __init__(self, exc: BaseException):
        cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc  # the compiler's own error
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        super().__init__(f"the network compiled by torch.compile failed ({type(cause).__name__}: {first}); run "
                         f"without --compile, --cuda_graphs and --fast to see whether compilation is the cause (a "
                         f"broken toolchain: Triton on CUDA, a C++ compiler on the CPU)")


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


class PixelPrior(PriorBase):
    """A guided-diffusion ε-model in pixel space, purifying with full DDIM or one Tweedie step."""

    space = "pixel"
    to_image = None

    def __init__(self, model: torch.nn.Module, *, full_ddim: bool = True, ddim_num_iterations: int = 20,
                 precision: str = "auto", device: torch.device | str = "cpu", model_path: Optional[str] = None):
        self.model = model
        self.full_ddim = full_ddim
        self.n = int(ddim_num_iterations)
        self.device = torch.device(device)
        self.precision = precision
        self.model_path = model_path
        self._compile_checked = False
        autocast_context(self.device, precision)  # validate early

    @classmethod
    def from_config(cls, model_config: dict, build: PriorBuild) -> "PixelPrior":
        from .unet import create_model

        model = create_model(**model_config).to(build.device)
        model.eval().requires_grad_(False)
        if build.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if build.compile_model:  # True, or a torch.compile mode ("reduce-overhead" captures CUDA graphs)
            model = torch.compile(model, mode=None if build.compile_model is True else build.compile_model)
        return cls(model, full_ddim=build.full_ddim, ddim_num_iterations=build.ddim_num_iterations,
                   precision=build.precision, device=build.device, model_path=model_config.get("model_path"))

    def describe(self) -> dict:
        # the network precision changes a pixel prior's numbers
        return {"kind": "pixel", "model_path": self.model_path, "run_suffix": "",
                "precision": resolve_precision(self.device, self.precision)}

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (the UNet's downsampling factor)."""
        model = getattr(self.model, "_orig_mod", self.model)  # a torch.compile wrapper
        return int(getattr(model, "downsample_factor", 1))

    def init(self, shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
        return torch.zeros(tuple(shape), device=self.device)

    def _eps_model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.device, self.precision):
            if self._compile_checked or not hasattr(self.model, "_orig_mod"):
                return self.model(x, t)
            try:  # the first call of a torch.compile'd network is where its compiler runs
                out = self.model(x, t)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - told apart below by running the network uncompiled
                self.model._orig_mod(x, t)  # an error that is not the compiler's is raised here, as it is
                raise CompileError(exc) from exc
            self._compile_checked = True
            return out

    @torch.no_grad()
    def purify(self, x: torch.Tensor, T_k: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
        noise = randn_per_image(x.shape, generators, x.device, x.dtype)
        x_t = q_sample(x, T_k - 1, noise)               # noised at the original index T_k − 1
        if self.full_ddim:
            return ddim_denoise(self._eps_model, x_t, T_k, self.n)
        return tweedie_denoise(self._eps_model, x_t, T_k)

    def nfe(self, T_k: int) -> int:
        return ddim_nfe(T_k, self.n) if self.full_ddim else 1
