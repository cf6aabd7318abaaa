"""The latent-diffusion prior for DCDP: the variable the data-consistency phase optimises, and its purifier.

Two modes, as DCDP-LDM's ``--data_consistency_type``:
- ``pixel``: the variable is the image x (B, 3, H, W), starting at zero. Purification encodes x,
  noises and denoises the latent, and decodes: x ← D(P(E(x))).
- ``latent``: the variable is the latent z (B, 3, H/4, W/4), starting at N(0, I). The data-consistency
  phase optimises z through A∘D (``to_image`` is differentiable). Purification first re-encodes,
  z ← E(D(z)), then noises and denoises: z ← P(E(D(z))).
P is `schedule.purify_latent`: q_sample at T_k − 1, then min(T_k, 20) DDIM steps or one Tweedie step.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from guided_diffusion.priors import PriorBase, PriorBuild
from util.noise import randn_per_image
from util.schema import choice_key

from .loading import load_latent_model
from .model import LatentDiffusion
from .schedule import num_ddim_steps, purify_latent

DATA_CONSISTENCY_TYPES = ("pixel", "latent")


class LatentPrior(PriorBase):
    """Latent DCDP prior around a loaded LDM; independent of the driver.

    `model_config` is a ``kind: latent`` model configuration dict (see `loading.parse_model_config`).
    """

    # purification-config keys read by this prior (DCDP-LDM's --data_consistency_type; null: pixel)
    OPTIONS = {"data_consistency_type": choice_key(DATA_CONSISTENCY_TYPES, None, nullable=True)}

    def __init__(
        self,
        model_config: dict,
        device: torch.device | str = "cpu",
        data_consistency_type: str = "pixel",
        full_ddim: bool = True,
        ddim_num_iterations: int = 20,
        model: LatentDiffusion | None = None,
    ):
        if data_consistency_type not in DATA_CONSISTENCY_TYPES:
            raise ValueError(
                f"purification config: data_consistency_type must be one of {', '.join(DATA_CONSISTENCY_TYPES)}, "
                f"got {data_consistency_type!r}"
            )
        if ddim_num_iterations < 1:
            raise ValueError(f"purification config: ddim_num_iterations must be >= 1, got {ddim_num_iterations}")
        self.device = torch.device(device)
        self.model = model if model is not None else load_latent_model(model_config, self.device)
        self.space = data_consistency_type
        self.full_ddim = full_ddim
        self.ddim_num_iterations = ddim_num_iterations
        self.model_path = model_config.get("model_path")

    @classmethod
    def from_config(cls, model_config: dict, build: PriorBuild) -> "LatentPrior":
        return cls(model_config, build.device, data_consistency_type=build.options.get("data_consistency_type", "pixel"),
                   full_ddim=build.full_ddim, ddim_num_iterations=build.ddim_num_iterations)

    def describe(self) -> dict:
        return {"kind": "latent", "model_path": self.model_path, "run_suffix": f"latent_{self.space}", "precision": None}

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int, int]:
        """(B, 3, H, W) -> (B, embed_dim, H/f, W/f)."""
        b, _, h, w = image_shape
        f = self.model.downsampling_factor
        if h % f or w % f:
            raise ValueError(f"latent prior: image size {h}x{w} must be a multiple of {f}; crop or resize the images")
        return b, self.model.latent_channels, h // f, w // f

    def init(self, shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Initial variable for images of `shape` (B, 3, H, W): zeros (pixel) or N(0, I) latents (latent)."""
        if self.space == "pixel":
            return torch.zeros(tuple(shape), device=self.device)
        return randn_per_image(self.latent_shape(shape), generators, self.device)

    @property
    def to_image(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """v -> image (B, 3, H, W), roughly [-1, 1]: the decoder (differentiable in z) in latent mode; None in
        pixel mode, where the variable is the image itself (the driver's convention for an identity)."""
        return None if self.space == "pixel" else self.model.decode

    @torch.no_grad()
    def purify(self, v: torch.Tensor, T_k: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Purify the variable at noise level T_k (1 … 1000); returns a detached tensor shaped like v."""
        if self.space == "pixel":
            z = self.model.encode(v)
        else:
            z = self.model.encode(self.model.decode(v))  # re-encode: z ← E(D(z))
        noise = randn_per_image(z.shape, generators, z.device)
        z = purify_latent(
            self.model.eps, z, int(T_k), noise, self.model.alphas_cumprod, self.full_ddim, self.ddim_num_iterations
        )
        return self.model.decode(z) if self.space == "pixel" else z

    def nfe(self, T_k: int) -> int:
        """UNet evaluations of one purification at T_k (VQ encode/decode calls not counted)."""
        return num_ddim_steps(int(T_k), self.ddim_num_iterations) if self.full_ddim else 1
