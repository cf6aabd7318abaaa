"""MATLAB-style bicubic resize written as a matrix, the super-resolution operator's A.

The official code uses Shocher's `Resizer` (MATLAB `imresize` semantics): Keys' cubic kernel with
a = -0.5, stretched by 1/scale when downscaling (antialiasing), output pixel i centred at input
coordinate (i + 0.5) / scale - 0.5, weights normalised to sum 1 per output pixel, and taps outside
the image folded back by half-sample symmetric reflection (index -1 -> 0, n -> n - 1). Along one
dimension that is a fixed linear map, so we build it once as an (out, in) matrix M; a 2-D resize is
then y = M_h x M_wᵀ, and its exact adjoint is M_hᵀ y M_w.
"""
from __future__ import annotations

import math

import numpy as np

CUBIC_WIDTH = 4.0  # support of Keys' cubic kernel, in input pixels (taps at |d| < 2)


def cubic(d: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic'), evaluated elementwise."""
    ad = np.abs(d)
    ad2, ad3 = ad**2, ad**3
    inner = (1.5 * ad3 - 2.5 * ad2 + 1.0) * (ad <= 1)
    outer = (-0.5 * ad3 + 2.5 * ad2 - 4.0 * ad + 2.0) * ((ad > 1) & (ad <= 2))
    return inner + outer


def _fold_symmetric(j: np.ndarray, n: int) -> np.ndarray:
    """Half-sample symmetric reflection of integer indices into [0, n): -1 -> 0, n -> n - 1."""
    m = np.mod(j, 2 * n)
    return np.where(m >= n, 2 * n - 1 - m, m)


def imresize_matrix(in_size: int, scale: float, out_size: int | None = None) -> np.ndarray:
    """The 1-D MATLAB-style bicubic resize of length `in_size` by the factor `scale`, as a matrix.

    Args:
        in_size: number of input samples (> 0).
        scale: output/input size ratio, e.g. 0.25 for a x4 downscale. Downscaling (scale < 1)
            antialiases: the kernel is stretched by 1/scale, so a x4 downscale has 16-tap rows.
        out_size: number of output samples; default ceil(in_size * scale), as MATLAB. When it is not
            exactly in_size * scale the output grid is centred on the input grid (Shocher's shift).

    Returns:
        float64 array (out_size, in_size); every row sums to 1. Resizing a signal v is M @ v.
    """
    if in_size < 1 or scale <= 0:
        raise ValueError(f"imresize_matrix: need in_size >= 1 and scale > 0, got in_size={in_size}, scale={scale}")
    if out_size is None:
        out_size = math.ceil(in_size * scale)
    antialias = scale < 1
    stretch = 1.0 / scale if antialias else 1.0
    width = CUBIC_WIDTH * stretch

    # Centre of output pixel i in input coordinates (0-based; MATLAB's 1-based formula shifted).
    shift = (out_size - in_size * scale) / 2
    centres = (np.arange(out_size) + 0.5 - shift) / scale - 0.5  # (out,)

    # Every tap with non-zero weight lies strictly within width/2 of its centre.
    n_taps = int(math.ceil(width)) + 2
    taps = np.floor(centres - width / 2)[:, None] + np.arange(n_taps)[None, :]  # (out, n_taps)
    weights = cubic((centres[:, None] - taps) / stretch)
    sums = weights.sum(axis=1, keepdims=True)
    weights = weights / np.where(sums == 0, 1.0, sums)

    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_size)[:, None], taps.shape)
    np.add.at(matrix, (rows, _fold_symmetric(taps.astype(np.int64), in_size)), weights)
    return matrix
