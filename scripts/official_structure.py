"""The official code's structure, for `scripts/benchmark.py --paths official`: its blur (reflect padding and
a depthwise convolution through autograd), its operators seen through autograd only, and its attention
(an explicit float32 softmax), swapped into our UNet's blocks while a benchmark row runs."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from guided_diffusion import unet_blocks as unet_module  # its attention is swapped for the official one


class ConvBlur:
    """The official blur: ReflectionPad2d(k//2) + depthwise Conv2d, differentiated by autograd."""

    is_linear = False  # forces the autograd data-consistency path, as the official code

    def __init__(self, kernel: torch.Tensor):
        self.weight = kernel.float().expand(3, 1, *kernel.shape).contiguous()

    def forward(self, x, **state):
        pad = self.weight.shape[-1] // 2
        return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), self.weight.to(x.device, x.dtype), groups=3)


class Autograd:
    """An operator seen through autograd only (no exact transpose), as the official solver sees it."""

    is_linear = False

    def __init__(self, op):
        self.op = op

    def forward(self, x, **state):
        return self.op.forward(x, **state)


def explicit_attention(q, k, v):
    """The reference's attention: explicit float32 softmax of q·kᵀ/sqrt(d)."""
    scale = q.shape[-1] ** -0.5
    w = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1, dtype=torch.float32).to(q.dtype)
    return w @ v


@contextlib.contextmanager
def official_attention(enabled: bool):
    saved = unet_module.attention
    if enabled:
        unet_module.attention = explicit_attention
    try:
        yield
    finally:
        unet_module.attention = saved
