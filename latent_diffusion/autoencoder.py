"""VQ-f4 autoencoder (the first stage of the CompVis LDMs), with the checkpoint's key names.

Images are (B, 3, H, W) in [-1, 1] with H and W multiples of 2^(levels-1); latents are
(B, embed_dim, H/f, W/f), f = 4 for the public vq-f4 model (256 -> 64 -> 256).

`encode` stops before quantisation (LDM's ``encode_first_stage``); `decode` quantises to the
nearest codebook vector with a straight-through gradient, then decodes (``decode_first_stage``).
The decoder output is not clamped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQConfig:
    """Hyper-parameters of the VQ autoencoder (the ``ddconfig`` plus ``embed_dim``/``n_embed`` upstream)."""

    embed_dim: int = 3  # codebook vector width = latent channels
    n_embed: int = 8192  # codebook size
    z_channels: int = 3  # encoder output / decoder input channels (before quant_conv / after post_quant_conv)
    resolution: int = 256  # image size the attention resolutions refer to
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128  # base width; level i has ch * ch_mult[i] channels
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)  # extra AttnBlocks at these pixel sizes
    double_z: bool = False
    dropout: float = 0.0

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    # The VQ autoencoder uses eps 1e-6, unlike the UNet's GroupNorm32 (1e-5).
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm1, swish, conv1, norm2, swish, dropout, conv2, plus a 1x1 `nin_shortcut` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, 1x1 conv projections, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(b, 1, c, height * width).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), softmax scale C^-1/2
        return x + self.proj_out(h.transpose(-1, -2).reshape(b, c, height, width))


class Downsample(nn.Module):
    """Zero-pad one pixel on the right and bottom only, then a stride-2 3x3 conv (not symmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (AttnBlocks, usually empty), optional resampler."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = [1] + list(cfg.ch_mult)
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            c_in, c_out = cfg.ch * in_mult[i], cfg.ch * mult
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(c_out) for _ in blocks] if res in cfg.attn_resolutions else []
            level = _Level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid = _Mid(c, cfg.dropout)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, H/f, W/f) -> (B, out_ch, H, W). `up[i]` is resolution level i; `up[-1]` runs first."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        c = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsampling_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(c, cfg.dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(c if j == 0 else c_out, c_out, cfg.dropout) for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(c_out) for _ in blocks] if res in cfg.attn_resolutions else []
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(c_out)
                res *= 2
            levels.insert(0, level)
            c = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantiser with a straight-through gradient (taming's VectorQuantizer2, legacy)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        # Upstream's initialisation, uniform(-1/n, 1/n) (it also avoids normal_, slow on the meta device).
        codebook = torch.empty(n_embed, embed_dim).uniform_(-1.0 / n_embed, 1.0 / n_embed)
        self.embedding = nn.Embedding.from_pretrained(codebook, freeze=False)

    def indices(self, z: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Codebook index of each latent vector: (B, C, h, w) -> (B, h, w), int64."""
        b, c, height, width = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
        e = self.embedding.weight  # (N, C)
        e_sq = e.pow(2).sum(1)
        out = []
        for part in flat.split(chunk):
            # Squared L2 distance written as upstream does, so near-ties resolve the same way.
            d = part.pow(2).sum(1, keepdim=True) + e_sq - 2 * part @ e.t()
            out.append(d.argmin(dim=1))
        return torch.cat(out).reshape(b, height, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Quantise z (B, C, h, w); the value is the codebook vector, the gradient w.r.t. z is the identity."""
        with torch.no_grad():
            z_q = self.embedding.weight[self.indices(z.detach())].permute(0, 3, 1, 2)  # (B, C, h, w)
        return z + (z_q - z).detach()


class VQModel(nn.Module):
    """Encoder, quant_conv, quantize, post_quant_conv, decoder: the LDM ``first_stage_model``."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> latent (B, embed_dim, H/f, W/f), not quantised."""
        f = self.config.downsampling_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"VQ encode: image size {tuple(x.shape[-2:])} must be a multiple of {f}; crop or resize it")
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, embed_dim, h, w) -> image (B, 3, f*h, f*w), roughly [-1, 1]; quantises first (straight-through)."""
        return self.decoder(self.post_quant_conv(self.quantize(z)))
