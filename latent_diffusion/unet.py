"""The LDM UNet (CompVis ``openaimodel.UNetModel``) for the ffhq-ldm-vq-4 and cin256-v2 checkpoints.

An ε-prediction network on latents: ``UNetModel(z_t, t, context) -> ε̂``, z_t (B, C, h, w), t (B,)
integer timesteps in [0, 999], context (B, L, context_dim) for cross-attention models. Key names are
the checkpoint's (after the ``model.diffusion_model.`` prefix).

Differences from guided-diffusion's ADM UNet that matter for these checkpoints: no scale-shift norm
(the time embedding is added), conv Downsample/Upsample blocks instead of resampling ResBlocks,
`attention_resolutions` are downsampling factors, and the attention slots hold either a legacy
``AttentionBlock`` (per-head [q k v] channel order, Conv1d weights) or a ``SpatialTransformer``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.unet import timestep_embedding

from .attention import AttentionBlock, GroupNorm32, SpatialTransformer


@dataclass
class UNetConfig:
    """Hyper-parameters of ``openaimodel.UNetModel`` as the LDM YAML spells them."""

    image_size: int = 64  # latent size; informational, the network is fully convolutional
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 224
    attention_resolutions: list[int] = field(default_factory=lambda: [8, 4, 2])  # downsampling factors
    num_res_blocks: int = 2
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    num_heads: int = -1
    num_head_channels: int = 32  # -1: use num_heads
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    dropout: float = 0.0

    def attention_heads(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of an attention slot at `channels`: num_head_channels wins over num_heads."""
        heads = self.num_heads if self.num_head_channels == -1 else channels // self.num_head_channels
        return heads, channels // heads


class ResBlock(nn.Module):
    """GN, SiLU, conv; + Linear(emb); GN, SiLU, dropout, conv; plus a skip (1x1 conv when widths differ)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """3x3 conv, stride 2, symmetric padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Runs its layers in order, handing the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """ε-prediction UNet: (z_t (B, C, h, w), t (B,), context (B, L, D) or None) -> ε̂ (B, out_channels, h, w)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if cfg.use_spatial_transformer and cfg.context_dim is None:
            raise ValueError("unet: use_spatial_transformer needs context_dim; set unet.context_dim in the model config")
        self.config = cfg
        mc = cfg.model_channels
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc, cfg.dropout)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(self._attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, cfg.dropout), self._attention(ch), ResBlock(ch, emb_dim, ch, cfg.dropout)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, cfg.dropout)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(self._attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def _attention(self, channels: int) -> nn.Module:
        cfg = self.config
        heads, head_dim = cfg.attention_heads(channels)
        if cfg.use_spatial_transformer:
            return SpatialTransformer(channels, heads, head_dim, cfg.transformer_depth, cfg.context_dim, cfg.dropout)
        return AttentionBlock(channels, heads)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))  # (B, 4*mc)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h.type(x.dtype))
