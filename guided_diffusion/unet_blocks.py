"""The building blocks of the guided-diffusion ADM UNet (`unet.py`), named as guided-diffusion names
them so that its checkpoints load unchanged: GroupNorm32, Up/Downsample, ResBlock, AttentionBlock (legacy
QKV order, through `F.scaled_dot_product_attention`), the sinusoidal timestep embedding."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32  # GroupNorm groups, fixed by the checkpoints


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `[cos(t·f), sin(t·f)]` (cosine first), f_i = max_period^(-i/half).

    timesteps: (B,) integer or float steps (raw 0..999, not rescaled). Returns (B, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (autocast-friendly)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(GROUPS, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: ADM starts every residual branch and the output at zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3x3 conv (`conv`) when `use_conv` (only without resblock_updown)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (`op`) when `use_conv`, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.op = (
            nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
            if use_conv
            else nn.AvgPool2d(kernel_size=2, stride=2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """GN-SiLU-conv, timestep injection (scale-shift: GN(h)·(1+scale)+shift), GN-SiLU-dropout-conv, skip.

    With `up`/`down` the (parameter-free) resampling sits between SiLU and the first conv, and the
    residual input is resampled the same way. Key indices: in_layers.{0,2}, emb_layers.1,
    out_layers.{0,3}, skip_connection (1x1 conv, only when the channel count changes).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W); emb: (B, emb_channels) → (B, C_out, H', W')."""
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (B, 2·C_out or C_out, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)  # first half scale, second half shift
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention over the H·W tokens with a residual connection.

    Keys: `norm`, `qkv` (Conv1d kernel 1, weight (3C, C, 1)), `proj_out` (Conv1d, (C, C, 1)). The Conv1d
    modules only hold the weights in the checkpoint's shapes; they are applied as linear maps over
    the tokens, which keeps channels_last inputs free of copies.

    `legacy_order` (guided-diffusion's default, the public checkpoints) groups the 3C qkv channels by
    head: [h0: q k v | h1: q k v | ...]; the new order is [all q | all k | all v].
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, legacy_order: bool = True):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"model config: num_head_channels={num_head_channels} does not divide the attention "
                    f"channel count {channels}; choose a divisor of it (or -1 to use num_heads)"
                )
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"model config: num_heads={self.num_heads} does not divide {channels} channels; choose a divisor")
        self.legacy_order = legacy_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → (B, C, H, W)."""
        b, c, hh, ww = x.shape
        heads, ch = self.num_heads, c // self.num_heads
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, hh * ww, c)  # (B, T, C)
        qkv = F.linear(tokens, self.qkv.weight[:, :, 0], self.qkv.bias)  # (B, T, 3C)
        if self.legacy_order:
            q, k, v = qkv.view(b, hh * ww, heads, 3 * ch).split(ch, dim=-1)  # each (B, T, heads, ch)
        else:
            q, k, v = (z.view(b, hh * ww, heads, ch) for z in qkv.chunk(3, dim=-1))
        a = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, heads, T, ch)
        a = a.transpose(1, 2).reshape(b, hh * ww, c)  # (B, T, C), channel = head·ch + i
        h = F.linear(a, self.proj_out.weight[:, :, 0], self.proj_out.bias)  # (B, T, C)
        return x + h.view(b, hh, ww, c).permute(0, 3, 1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v over (B, heads, T, d) tensors.

    The fused kernels accumulate the logits and the softmax in float32 for half inputs, as the
    reference's explicit `softmax(w.float())` does.
    """
    return F.scaled_dot_product_attention(q, k, v)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to the ResBlocks among its children."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x
