"""The `nonlinear_blur` operator: bkse's learned blur with a per-image latent kernel k.

    A(x; k) = clamp(2·adaptKernel((x + 1)/2, k) − 1, −1, 1)

x is (B, 3, H, W) in [-1, 1] with H, W multiples of 128; k is (B, 8·nf, H/128, W/128) =
1.2·N(0, I), drawn once per image by `draw_state` and passed to every `forward`, so the measurement
and all data-consistency steps use the same kernel (DPS redraws it at every call; DCDP fixed that).
"""
from __future__ import annotations

import torch

from bkse.kernel_wizard import SPATIAL_DIVISOR
from bkse.loader import DEFAULT_OPTIONS, load_kernel_wizard
from guided_diffusion.measurements import Operator, register_operator

KERNEL_STD = 1.2  # upstream draws randn(1, 512, 2, 2) * 1.2


@register_operator("nonlinear_blur")
class NonlinearBlurOperator(Operator):
    """Nonlinear blur by the KernelWizard of `opt_yml_path` (GOPRO_wVAE.pth by default).

    The network is built and loaded once, frozen, on `device`; gradients flow to x through autograd.
    `random_weights` is True when the options say `pretrained: null` (tests and demos only).
    """

    is_linear = False

    def __init__(self, opt_yml_path: str = DEFAULT_OPTIONS, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = load_kernel_wizard(opt_yml_path, device=self.device, adapt_only=True)
        self.random_weights = self.model.random_weights
        self.kernel_channels = self.model.kernel_channels
        self.memory_format = torch.contiguous_format

    def channels_last(self) -> "NonlinearBlurOperator":
        """Run the network channels-last (the fast path): the same convolutions, faster kernels on GPUs."""
        self.model = self.model.to(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last
        return self

    def draw_state(self, generator: torch.Generator, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """{"kernel": (1, 8·nf, H/128, W/128)} = 1.2·N(0, I), drawn on the CPU from `generator`
        for an image of `shape` (..., H, W), then moved to the operator's device."""
        h, w = shape[-2:]
        self._check_size(h, w)
        kernel = torch.randn((1, self.kernel_channels, h // SPATIAL_DIVISOR, w // SPATIAL_DIVISOR),
                             generator=generator) * KERNEL_STD
        return {"kernel": kernel.to(self.device)}

    def forward(self, x: torch.Tensor, kernel: torch.Tensor | None = None) -> torch.Tensor:
        """A(x; k): x (B, 3, H, W) in [-1, 1], kernel (B or 1, 8·nf, H/128, W/128) → (B, 3, H, W) in [-1, 1]."""
        if kernel is None:
            raise ValueError("nonlinear_blur: forward needs kernel=..., the latent kernel returned by draw_state")
        self._check_size(*x.shape[-2:])
        u = ((x + 1.0) / 2.0).contiguous(memory_format=self.memory_format)  # [-1, 1] → [0, 1], not clamped
        b = self.model.adaptKernel(u, kernel)
        return (b * 2.0 - 1.0).clamp(-1.0, 1.0)

    @staticmethod
    def _check_size(h: int, w: int) -> None:
        if h % SPATIAL_DIVISOR or w % SPATIAL_DIVISOR:
            raise ValueError(
                f"nonlinear_blur: image size {h}×{w} is not a multiple of {SPATIAL_DIVISOR} (the KernelWizard "
                f"downsamples 128×); use 256×256 images (others.img_size) or crop/resize to a multiple of 128"
            )
