"""The latent diffusion model as one module whose state_dict keys are the checkpoint's.

``LatentDiffusion`` holds ``model.diffusion_model`` (the UNet), ``first_stage_model`` (the VQ
autoencoder) and, for class-conditional models, ``cond_stage_model.embedding``. The schedule is kept
as a float64 attribute, not as buffers: checkpoints store it, the loader checks it against ours.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .autoencoder import VQConfig, VQModel
from .schedule import ldm_betas, schedule_buffers
from .unet import UNetConfig, UNetModel


@dataclass
class CondStageConfig:
    """``ClassEmbedder``: one learnt vector per class; the last row is the null class."""

    n_classes: int = 1001
    embed_dim: int = 512


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    linear_start: float = 0.0015
    linear_end: float = 0.0195
    scale_factor: float = 1.0  # z = scale_factor · quant_conv output; 1.0 for the VQ LDMs (not SD's 0.18215)


@dataclass
class LatentModelConfig:
    """Everything needed to build the network; paths and loading options live in the loader."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    first_stage: VQConfig = field(default_factory=VQConfig)
    cond_stage: CondStageConfig | None = None
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    class_label: int | None = None  # label fed to a class-conditional model; n_classes − 1 is the null class


class ClassEmbedder(nn.Module):
    def __init__(self, cfg: CondStageConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.n_classes, cfg.embed_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) int64 -> context (B, 1, embed_dim)."""
        return self.embedding(labels)[:, None]


class DiffusionWrapper(nn.Module):
    """Only there so the UNet's keys carry upstream's ``model.diffusion_model.`` prefix."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class LatentDiffusion(nn.Module):
    """ε-prediction LDM on VQ latents. Images (B, 3, H, W) in [-1, 1] <-> latents (B, 3, H/4, W/4)."""

    def __init__(self, cfg: LatentModelConfig):
        super().__init__()
        if (cfg.cond_stage is None) != (cfg.unet.context_dim is None):
            raise ValueError(
                "model config: cond_stage and unet.context_dim go together (class-conditional) or are both null"
            )
        if cfg.cond_stage is not None and cfg.cond_stage.embed_dim != cfg.unet.context_dim:
            raise ValueError(
                f"model config: cond_stage.embed_dim {cfg.cond_stage.embed_dim} != unet.context_dim {cfg.unet.context_dim}"
            )
        self.config = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = VQModel(cfg.first_stage)
        if cfg.cond_stage is not None:
            self.cond_stage_model = ClassEmbedder(cfg.cond_stage)
        d = cfg.diffusion
        self.schedule = schedule_buffers(ldm_betas(d.timesteps, d.linear_start, d.linear_end))  # float64, CPU

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.schedule["alphas_cumprod"]

    @property
    def latent_channels(self) -> int:
        return self.config.first_stage.embed_dim

    @property
    def downsampling_factor(self) -> int:
        return self.config.first_stage.downsampling_factor

    def context(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """Cross-attention context for the configured class label, (B, 1, D), or None if unconditional."""
        if self.config.cond_stage is None:
            return None
        labels = torch.full((batch_size,), self.config.class_label, dtype=torch.long, device=device)
        return self.cond_stage_model(labels)

    def eps(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂(z_t, t): z_t (B, 3, h, w), t (B,) int64 in [0, timesteps)."""
        return self.model.diffusion_model(z_t, t, self.context(z_t.shape[0], z_t.device))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``get_first_stage_encoding(encode_first_stage(x))``: pre-quantisation latent × scale_factor."""
        return self.config.diffusion.scale_factor * self.first_stage_model.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``decode_first_stage(z)``: quantise z / scale_factor (straight-through) and decode; differentiable in z."""
        return self.first_stage_model.decode(z / self.config.diffusion.scale_factor)
