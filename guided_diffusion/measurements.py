"""Forward operators A and measurement noise, each behind a registry keyed by its YAML name.

Operators map images (B, 3, H, W) in [-1, 1] to measurements. `forward` is A(x), deterministic and
noise-free; linear operators also have `transpose`, the exact adjoint. Per-image randomness (a random
mask, a latent blur kernel) is drawn by `draw_state` from the image's own generator and passed back
to `forward`/`transpose` as keyword tensors, batched along dim 0.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import scipy.ndimage
import torch

from motionblur import motion_kernel
from util.fft import KernelFFT, fft2c, ifft2c, kernel_fft, reflect_correlate, reflect_correlate_adjoint
from util.noise import Generators, draw_per_image
from util.registry import Registry
from util.resizer import imresize_matrix

# Extensions outside this package are lazy entries: imported when their name is first used.
__OPERATORS__ = Registry("operator", lazy={
    "inpainting": "guided_diffusion.inpainting:InpaintingOperator",
    "nonlinear_blur": "bkse.operator:NonlinearBlurOperator",
})
__NOISES__ = Registry("noise")
register_operator = __OPERATORS__.register
register_noise = __NOISES__.register


def get_operator(name: str, **params) -> "Operator":
    """Build the operator registered as `name` from the `measurement.operator` block of a task YAML."""
    return __OPERATORS__.build(name, params)


def get_noise(name: str, **params) -> "Noise":
    """Build the noise registered as `name` from the `measurement.noise` block of a task YAML."""
    return __NOISES__.build(name, params)


class Operator:
    """Base class. Subclasses set `is_linear` and implement `forward` (and `transpose` when linear).

    `mse_gradient` is the closed-form gradient of the data-consistency loss, used by the fast path
    instead of autograd where `closed_form_gradient` is true: every linear operator, and nonlinear
    ones that override it (phase retrieval).
    """

    name: str = ""
    is_linear: bool = False

    @property
    def closed_form_gradient(self) -> bool:
        return self.is_linear

    def draw_state(self, generator: torch.Generator, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Per-image random state, tensors with leading dim 1, drawn on the CPU from `generator`."""
        return {}

    def forward(self, x: torch.Tensor, **state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transpose(self, y: torch.Tensor, **state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"operator '{self.name}' is not linear and has no transpose")

    def mse_gradient(self, x: torch.Tensor, y: torch.Tensor, **state: torch.Tensor) -> torch.Tensor:
        """∇ₓ Σ_b mean((A(x_b) − y_b)²) = (2/N)·Aᵀ(Ax − y), N = numel(y_b): the per-image MSE gradient."""
        return self.transpose(self.forward(x, **state) - y, **state).mul_(2.0 / y[0].numel())

    def saved_state(self) -> dict[str, torch.Tensor]:
        """Per-run tensors worth saving with the outputs (e.g. the motion-blur kernel)."""
        return {}

    def __call__(self, x: torch.Tensor, **state: torch.Tensor) -> torch.Tensor:
        return self.forward(x, **state)


class Noise:
    name: str = ""

    def __call__(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


# ---- operators and noises are defined below (see docs/design.md) ----

Device = str | torch.device


def _image_hw(shape: Sequence[int], who: str) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"{who}: expected an image shape (..., H, W), got {tuple(shape)}")
    return int(shape[-2]), int(shape[-1])


def _check_int(value, name: str, who: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{who}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(value, name: str, who: str, low: float, high: float = math.inf, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise ValueError(f"{who}: {name} must be a number {bound}, got {value!r}")
    return float(value)


# ---- identity (denoising) ----

@register_operator("noise")
class DenoiseOperator(Operator):
    """A(x) = x: plain denoising. Linear, self-adjoint."""

    is_linear = True

    def __init__(self, device: Device = "cpu"):
        self.device = torch.device(device)

    def forward(self, x: torch.Tensor, **state: torch.Tensor) -> torch.Tensor:
        return x

    def transpose(self, y: torch.Tensor, **state: torch.Tensor) -> torch.Tensor:
        return y


# ---- super-resolution ----

@register_operator("super_resolution")
class SuperResolutionOperator(Operator):
    """MATLAB-style antialiased bicubic downscale by an integer factor s: (B, C, H, W) -> (B, C, H/s, W/s).

    y = M_h x M_wᵀ with the 1-D resize matrices of `util.resizer.imresize_matrix` (Shocher's
    `Resizer`, as the official code). The matrices are built for the actual image size on first
    use and cached per (H, W, device, dtype); `in_shape` is only the official size hint.
    `transpose` is the exact adjoint M_hᵀ y M_w. (The official `transpose`, a nearest-neighbour
    upsampling, is not the adjoint; DCDP never called it, its solver differentiates `forward`.)
    """

    is_linear = True

    def __init__(self, in_shape: Sequence[int] | None = None, scale_factor: int = 4, device: Device = "cpu"):
        who = "super_resolution"
        if isinstance(scale_factor, float) and scale_factor.is_integer():
            scale_factor = int(scale_factor)
        self.scale_factor = _check_int(scale_factor, "scale_factor", who)
        self.device = torch.device(device)
        self._matrices: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        if in_shape is not None:
            self._matrices_for(_image_hw(in_shape, f"{who}: in_shape"), self.device, torch.float32)

    def _matrices_for(self, hw: tuple[int, int], device: torch.device, dtype: torch.dtype):
        key = (hw, device, dtype)
        if key not in self._matrices:
            s = self.scale_factor
            if hw[0] % s or hw[1] % s:
                raise ValueError(
                    f"super_resolution: image size {hw[0]}x{hw[1]} is not divisible by scale_factor {s}; "
                    f"crop or resize the image to a multiple of {s}")
            m_h, m_w = (torch.from_numpy(imresize_matrix(n, 1.0 / s, out_size=n // s)) for n in hw)
            self._matrices[key] = (m_h.to(device=device, dtype=dtype), m_w.to(device=device, dtype=dtype))
        return self._matrices[key]

    def forward(self, x: torch.Tensor, **state: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H/s, W/s)."""
        m_h, m_w = self._matrices_for(tuple(x.shape[-2:]), x.device, x.dtype)
        return m_h @ x @ m_w.T

    def transpose(self, y: torch.Tensor, **state: torch.Tensor) -> torch.Tensor:
        """y (B, C, h, w) -> (B, C, h·s, w·s)."""
        s = self.scale_factor
        m_h, m_w = self._matrices_for((y.shape[-2] * s, y.shape[-1] * s), y.device, y.dtype)
        return m_h.T @ y @ m_w


# ---- blurs: reflect padding + depthwise cross-correlation, computed with FFTs ----

class BlurOperator(Operator):
    """Same-size blur: reflect-pad by k // 2, then cross-correlate every channel with one (k, k) kernel.

    This is the official `ReflectionPad2d(k // 2)` + depthwise `Conv2d(groups=3)`, computed with FFTs
    (`util.fft.reflect_correlate`, ms instead of seconds for k = 61). The kernel spectrum is cached per
    (H, W, device, dtype). Images need H, W > k // 2 (PyTorch's reflect-padding limit).
    """

    is_linear = True

    def __init__(self, kernel: torch.Tensor | np.ndarray, device: Device = "cpu"):
        kernel = torch.as_tensor(kernel)
        if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise ValueError(f"{self.name or 'blur'}: kernel must be a 2-D array with odd sides, got shape "
                             f"{tuple(kernel.shape)}")
        self.device = torch.device(device)
        self.kernel = kernel.to(device=self.device, dtype=torch.float32)  # (k, k)
        self._spectra: dict[tuple, KernelFFT] = {}

    @classmethod
    def from_kernel(cls, kernel: torch.Tensor | np.ndarray, device: Device = "cpu") -> "BlurOperator":
        """The operator with a given (k, k) kernel (odd k), e.g. a stored motion kernel."""
        op = cls.__new__(cls)
        BlurOperator.__init__(op, kernel, device)
        return op

    def _spectrum(self, x: torch.Tensor) -> KernelFFT:
        h, w = x.shape[-2:]
        kh, kw = self.kernel.shape
        if h <= kh // 2 or w <= kw // 2:
            raise ValueError(
                f"{self.name or 'blur'}: image {h}x{w} is too small for a {kh}x{kw} kernel (reflect padding needs "
                f"H, W > {max(kh, kw) // 2}); use a smaller kernel_size or a larger image")
        key = (h, w, x.device, x.dtype)
        if key not in self._spectra:
            self._spectra[key] = kernel_fft(self.kernel.to(device=x.device, dtype=x.dtype), (h, w))
        return self._spectra[key]

    def forward(self, x: torch.Tensor, **state: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        return reflect_correlate(x, self._spectrum(x))

    def transpose(self, y: torch.Tensor, **state: torch.Tensor) -> torch.Tensor:
        """Exact adjoint of `forward`: (B, C, H, W) -> (B, C, H, W)."""
        return reflect_correlate_adjoint(y, self._spectrum(y))

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {"kernel": self.kernel}


def gaussian_kernel(kernel_size: int, sigma: float) -> np.ndarray:
    """The official Gaussian kernel: `scipy.ndimage.gaussian_filter` of a centred delta (support 4σ).

    Returns float64 (kernel_size, kernel_size), normalised to sum 1.
    """
    delta = np.zeros((kernel_size, kernel_size))
    delta[kernel_size // 2, kernel_size // 2] = 1.0
    kernel = scipy.ndimage.gaussian_filter(delta, sigma=sigma)
    return kernel / kernel.sum()


def _check_kernel_size(kernel_size, who: str) -> int:
    kernel_size = _check_int(kernel_size, "kernel_size", who)
    if kernel_size % 2 == 0:
        raise ValueError(f"{who}: kernel_size must be odd (the blur keeps the image size), got {kernel_size}")
    return kernel_size


@register_operator("gaussian_blur")
class GaussianBlurOperator(BlurOperator):
    """Gaussian blur of standard deviation `intensity` pixels on a `kernel_size` square support."""

    def __init__(self, kernel_size: int, intensity: float, device: Device = "cpu"):
        kernel_size = _check_kernel_size(kernel_size, "gaussian_blur")
        sigma = _check_float(intensity, "intensity (the Gaussian sigma, pixels)", "gaussian_blur", 0.0, low_open=True)
        super().__init__(torch.from_numpy(gaussian_kernel(kernel_size, sigma)).float(), device)


@register_operator("motion_blur")
class MotionBlurOperator(BlurOperator):
    """Blur with one random motion kernel (`motionblur.motion_kernel`) drawn at construction from `seed`.

    As in the official code the kernel is drawn once per run and shared by all images (the official
    constructor draws two kernels from numpy's global RNG and keeps the second; we draw one from
    `np.random.default_rng(seed)`). Use `from_kernel` to rebuild an operator from a saved kernel.
    """

    def __init__(self, kernel_size: int, intensity: float, device: Device = "cpu", seed: int = 0):
        kernel_size = _check_kernel_size(kernel_size, "motion_blur")
        intensity = _check_float(intensity, "intensity", "motion_blur", 0.0, 1.0)
        seed = _check_int(seed, "seed", "motion_blur", minimum=0)
        kernel = motion_kernel(kernel_size, intensity, np.random.default_rng(seed))
        super().__init__(torch.from_numpy(kernel), device)


# ---- phase retrieval ----

@register_operator("phase_retrieval")
class PhaseRetrievalOperator(Operator):
    """Fourier magnitude of the zero-padded image: |fft2c(pad(x))|, (B, C, H, W) -> (B, C, H + 2p_h, W + 2p_w).

    p_h = int(oversample / 8 · H) zeros on each side (and likewise p_w from W): 64 for 256×256 with
    oversample 2, the official constant, which the official code computes from 256 whatever the image.
    The FFT is centred and orthonormal (complex64 for float32 input). Not linear; the official code
    differentiates it with autograd (torch's derivative of |z| at z = 0 is 0), and `mse_gradient` is
    the same gradient in closed form.
    """

    is_linear = False
    closed_form_gradient = True

    def __init__(self, oversample: float, device: Device = "cpu"):
        self.oversample = _check_float(oversample, "oversample", "phase_retrieval", 0.0)
        self.device = torch.device(device)

    def padding(self, h: int, w: int) -> tuple[int, int]:
        """Zeros added on each side along H and W."""
        return int(self.oversample / 8.0 * h), int(self.oversample / 8.0 * w)

    def forward(self, x: torch.Tensor, **state: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = self.padding(*x.shape[-2:])
        x = torch.nn.functional.pad(x, (pad_w, pad_w, pad_h, pad_h))
        return fft2c(x).abs()

    def mse_gradient(self, x: torch.Tensor, y: torch.Tensor, **state: torch.Tensor) -> torch.Tensor:
        """∇ₓ Σ_b mean((|Z_b| − y_b)²) with Z = fft2c(pad(x)): (2/N)·crop(Re(ifft2c((|Z| − y)·sgn Z))).

        fft2c is unitary, so its adjoint is ifft2c; sgn(0) = 0 matches autograd's |z|' at 0.
        """
        h, w = x.shape[-2:]
        pad_h, pad_w = self.padding(h, w)
        z = fft2c(torch.nn.functional.pad(x, (pad_w, pad_w, pad_h, pad_h)))
        r = ifft2c((z.abs() - y) * torch.sgn(z)).real
        return r[..., pad_h:pad_h + h, pad_w:pad_w + w].mul(2.0 / y[0].numel())


# ---- measurement noise ----

@register_noise("gaussian")
class GaussianNoise(Noise):
    """y + σ·n, n ~ N(0, I) drawn (float32) on the CPU from the image's generator."""

    def __init__(self, sigma: float):
        self.sigma = _check_float(sigma, "sigma", "gaussian noise", 0.0)

    def __call__(self, y: torch.Tensor, generator: Generators) -> torch.Tensor:
        """y (B, ...) -> y + σ·n. `generator`: one for the batch, or one per image."""
        noise = draw_per_image(y, generator, lambda v, g: torch.randn(v.shape, generator=g))
        return y + self.sigma * noise


@register_noise("poisson")
class PoissonNoise(Noise):
    """Shot noise as DPS: counts ~ Poisson(255·rate·y01) with y01 = clamp((y + 1)/2, 0, 1), then
    y' = clamp(2·counts/(255·rate) − 1, −1, 1). `rate` scales the photon count per 8-bit grey level.
    Drawn on the CPU from the image's generator; no gradient flows through it.
    """

    def __init__(self, rate: float):
        self.rate = _check_float(rate, "rate", "poisson noise", 0.0, low_open=True)

    def __call__(self, y: torch.Tensor, generator: Generators) -> torch.Tensor:
        """y (B, ...) in [-1, 1] -> noisy y in [-1, 1]."""
        scale = 255.0 * self.rate

        def draw(v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            y01 = ((v.double() + 1.0) / 2.0).clamp(0.0, 1.0)
            counts = torch.poisson(y01 * scale, generator=g)
            return (counts / scale * 2.0 - 1.0).clamp(-1.0, 1.0)

        return draw_per_image(y, generator, draw)
