"""The OpenAI consistency-model UNet (`cm/unet.py`), written to load the public CD/CT checkpoints.

It is guided-diffusion's ADM UNet: the ResBlocks, the sinusoidal timestep embedding, GroupNorm32 and
the block layout are the ones of `guided_diffusion.unet` and are reused from there. One part differs,
the attention block (`CMAttentionBlock`):
- `qkv` and `proj_out` are 1x1 **Conv2d** layers (weights (3C, C, 1, 1) and (C, C, 1, 1)), not Conv1d;
- the 3C qkv channels are q|k|v-major, `[all q heads | all k heads | all v heads]` (einops
  `(three h d)`), not ADM's per-head legacy grouping. Reading the weights in the other order gives
  wrong numbers with no shape error.

The time input is the consistency model's c_noise = 250·ln σ (a float, negative below σ = 1), fed to
the same sinusoidal embedding. Module and parameter names are exactly `cm/unet.py`'s, so the released
state_dicts load unchanged with `strict=True`.

Reference run-time differences that do not change the numbers (fp32): attention runs through
`F.scaled_dot_product_attention` (the reference uses flash-attn on fp16 with scale 1/√d). With
`torso_dtype` set, the input/middle/output blocks run under autocast in that dtype while the time
embedding, label embedding and `out` stay float32, the split the reference's `use_fp16` makes.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.unet import (  # noqa: F401  (NUM_CLASSES is re-exported for the loader)
    NUM_CLASSES,
    UNetModel,
    architecture_kwargs,
    normalization,
    zero_module,
)


# cm/script_util.py model_and_diffusion_defaults(), network part.
NETWORK_DEFAULTS = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    channel_mult="",
    attention_resolutions="32,16,8",
    num_heads=4,
    num_head_channels=64,
    num_heads_upsample=-1,
    class_cond=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
    dropout=0.0,
    learn_sigma=False,
)


class CMAttentionBlock(nn.Module):
    """Self-attention over the H·W tokens with a residual connection, in the consistency models' layout.

    Keys: `norm` (GroupNorm32), `qkv` (Conv2d 1x1, (3C, C, 1, 1)), `proj_out` (Conv2d 1x1, zero-initialised).
    Heads: C // num_head_channels, or `num_heads` when num_head_channels is -1.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1):
        super().__init__()
        heads = num_heads if num_head_channels == -1 else channels // max(num_head_channels, 1)
        if heads < 1 or channels % heads or (num_head_channels != -1 and channels % num_head_channels):
            raise ValueError(
                f"model config: num_heads={num_heads} / num_head_channels={num_head_channels} do not divide "
                f"the attention channel count {channels}; choose a divisor (num_head_channels -1 uses num_heads)"
            )
        self.num_heads = heads
        self.norm = normalization(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → (B, C, H, W)."""
        b, c, hh, ww = x.shape
        d = c // self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, d, hh * ww)  # (B, three, h, d, T)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, h, T, d)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q·kᵀ/√d)·v, (B, h, T, d)
        a = a.transpose(-1, -2).reshape(b, c, hh, ww)  # channel = head·d + i, einops (h d)
        return x + self.proj_out(a)


class ConsistencyUNet(UNetModel):
    """The consistency model's network F: `net(x, c_noise, y=None)`, an ADM UNet with CM attention.

    x: (B, in_channels, H, W), the preconditioned input c_in·x_σ; H and W multiples of 2^(levels−1).
    c_noise: (B,) floats 250·ln σ (or a scalar). y: (B,) int64 labels in [0, 999] when class-conditional.
    Returns the raw output F, (B, out_channels, H, W) float32.
    """

    def __init__(self, *, attention_ds: Sequence[int], **arch):
        super().__init__(attention_resolutions=attention_ds, **arch)
        self.torso_dtype: torch.dtype | None = None  # e.g. torch.float16 on CUDA, as the reference's use_fp16

    def make_attention(self, channels: int, num_heads: int) -> nn.Module:
        return CMAttentionBlock(channels, num_heads, self.num_head_channels)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); c_noise: (B,) 250·ln σ; y: (B,) labels or None → F, (B, out_channels, H, W)."""
        emb = self.embedding(x, c_noise, y)  # (B, 4·mc), float32
        torso = torch.autocast(x.device.type, dtype=self.torso_dtype) if self.torso_dtype else nullcontext()
        with torso:
            h = self.torso(x, emb)
        return self.out(h.float())


def build_network(**config) -> ConsistencyUNet:
    """A `ConsistencyUNet` from the network keys of a CM model config (defaults: `NETWORK_DEFAULTS`).

    Keys: image_size, num_channels, num_res_blocks, channel_mult ("" = the default for image_size),
    attention_resolutions (pixel sizes, "32,16,8"), num_heads, num_head_channels (overrides
    num_heads unless -1), num_heads_upsample, class_cond (1000 classes), use_scale_shift_norm,
    resblock_updown, dropout, learn_sigma (6 output channels instead of 3). Weights are random
    (zero-initialised residual branches and output, as the reference).
    """
    unknown = sorted(set(config) - set(NETWORK_DEFAULTS))
    if unknown:
        raise ValueError(f"consistency model config: unknown network key(s) {unknown}; valid keys are {sorted(NETWORK_DEFAULTS)}")
    cfg = {**NETWORK_DEFAULTS, **config}
    return ConsistencyUNet(**architecture_kwargs(cfg, "consistency model config"))
