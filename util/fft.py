"""Centred orthonormal FFTs and FFT-based reflect-padded cross-correlation.

The blur operators of the official code are `ReflectionPad2d(k // 2)` followed by a depthwise
`Conv2d` (a cross-correlation, "valid" on the padded image). A 61×61 direct convolution is slow on a
CPU, so we compute the same map with FFTs:

    A x = crop( irfft2( rfft2(pad_reflect(x)) · conj(K) ) ),   K = rfft2(kernel zero-padded),

and its exact adjoint

    Aᵀ y = pad_reflectᵀ( crop( irfft2( rfft2(y) · K ) ) ),

i.e. a full convolution of y with the kernel, scattered back through the reflect padding. The FFT
grid is at least as large as the padded image, so the circular wrap never reaches the kept part.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT over the last two dims: fftshift(fft2(ifftshift(x), norm="ortho"))."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def ifft2c(z: torch.Tensor) -> torch.Tensor:
    """Inverse of `fft2c`: fftshift(ifft2(ifftshift(z), norm="ortho"))."""
    z = torch.fft.ifftshift(z, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.ifft2(z, norm="ortho"), dim=(-2, -1))


def fast_fft_size(n: int) -> int:
    """Smallest 5-smooth integer (2^a 3^b 5^c) >= n: FFT lengths that pocketfft/cuFFT handle fastest."""
    m = max(int(n), 1)
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def reflect_pad_adjoint(z: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Adjoint of `F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="reflect")` over the last two dims.

    Reflect padding copies row 1 + t to padded row -1 - t and row H - 2 - t to row H + t; the
    adjoint keeps the centre and adds each border row back onto the row it was copied from.

    Args:
        z: (..., H + 2 pad_h, W + 2 pad_w).
    Returns:
        (..., H, W).
    """
    return _reflect_pad_adjoint_1d(_reflect_pad_adjoint_1d(z, pad_h, dim=-2), pad_w, dim=-1)


def _reflect_pad_adjoint_1d(z: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    if pad == 0:
        return z
    n = z.shape[dim] - 2 * pad
    x = z.narrow(dim, pad, n).clone()
    head = z.narrow(dim, 0, pad).flip(dim)  # padded rows -1 .. -pad, copies of rows 1 .. pad
    tail = z.narrow(dim, pad + n, pad).flip(dim)  # padded rows n+pad-1 .. n, copies of rows n-1-pad .. n-2
    x.narrow(dim, 1, pad).add_(head)
    x.narrow(dim, n - 1 - pad, pad).add_(tail)
    return x


@dataclass(frozen=True)
class KernelFFT:
    """A real (kh, kw) kernel ready for FFT correlation with (H, W) images.

    spectrum: rfft2 of the kernel zero-padded (at the end) to fft_shape, (N_h, N_w // 2 + 1) complex.
    spectrum_conj: its complex conjugate, materialised once (correlation multiplies by it).
    fft_shape: (N_h, N_w) >= (H + kh - 1, W + kw - 1), rounded up to 5-smooth sizes.
    """

    spectrum: torch.Tensor
    spectrum_conj: torch.Tensor
    kernel_hw: tuple[int, int]
    fft_shape: tuple[int, int]


def kernel_fft(kernel: torch.Tensor, image_hw: tuple[int, int]) -> KernelFFT:
    """Prepare a (kh, kw) real kernel (odd sides) for `reflect_correlate` on (H, W) images.

    The spectrum has the kernel's dtype and device (complex64 for float32, complex128 for float64).
    """
    kh, kw = kernel.shape
    h, w = image_hw
    fft_shape = (fast_fft_size(h + kh - 1), fast_fft_size(w + kw - 1))
    spectrum = torch.fft.rfft2(kernel, s=fft_shape)
    return KernelFFT(spectrum, spectrum.conj().resolve_conj(), (kh, kw), fft_shape)


def reflect_correlate(x: torch.Tensor, kfft: KernelFFT) -> torch.Tensor:
    """Reflect-pad by (kh // 2, kw // 2), then cross-correlate with the kernel ("valid"), via FFTs.

    Equals `conv2d(F.pad(x, ..., mode="reflect"), kernel)` per channel (PyTorch's conv is a
    cross-correlation: out[i, j] = Σ_ab k[a, b] · xpad[i + a, j + b]).

    Args:
        x: (..., H, W) real, the size `kfft` was built for; H > kh // 2 and W > kw // 2.
        kfft: from `kernel_fft(kernel, (H, W))`.
    Returns:
        (..., H, W), same dtype as x.
    """
    h, w = x.shape[-2:]
    kh, kw = kfft.kernel_hw
    xpad = torch.nn.functional.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    out = torch.fft.irfft2(torch.fft.rfft2(xpad, s=kfft.fft_shape) * kfft.spectrum_conj, s=kfft.fft_shape)
    return out[..., :h, :w]


def reflect_correlate_adjoint(y: torch.Tensor, kfft: KernelFFT) -> torch.Tensor:
    """Exact adjoint of `reflect_correlate`: full convolution with the kernel, then the reflect-pad adjoint.

    Args:
        y: (..., H, W) real.
    Returns:
        (..., H, W), same dtype as y.
    """
    h, w = y.shape[-2:]
    kh, kw = kfft.kernel_hw
    z = torch.fft.irfft2(torch.fft.rfft2(y, s=kfft.fft_shape) * kfft.spectrum, s=kfft.fft_shape)
    z = z[..., : h + kh - 1, : w + kw - 1]  # full convolution y * k; the grid is large enough not to wrap
    return reflect_pad_adjoint(z, kh // 2, kw // 2)
