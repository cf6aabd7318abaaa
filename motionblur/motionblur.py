"""Random motion-blur kernels (the algorithm of LeviBorodenko/motionblur, written from its description).

A camera-shake path is drawn on a canvas twice the kernel size (for antialiasing), then blurred,
downsampled and normalised:

1. Path length L = 0.75 · diag · (U(0, 1) + U(0, I²)), with diag the canvas diagonal and I the
   intensity in [0, 1] (0: straight line, 1: strongly curved).
2. Step lengths Beta(1, 30) · (1 - I + 0.1) · diag, drawn until their sum reaches L (steps longer
   than L are redrawn).
3. Step angles: the first ~ U(-θ_max, θ_max) with θ_max ~ U(0, I·π); each next one has magnitude
   Triangular(0, I·θ_max, θ_max + 0.1) and, with probability "jitter" ~ Beta(2, 20), the opposite
   sign of the previous angle (otherwise the same sign).
4. The path is the cumulative sum of the steps (as complex numbers), centred on its centre of mass,
   rotated by U(0, π) and moved to the canvas centre.
5. It is drawn as a white PIL line of width max(1, int(diag / 150)), blurred with a PIL GaussianBlur of
   radius int(0.01 · diag), resized to the kernel size with LANCZOS, and normalised to sum 1.

The draws are made in exactly this order from the `rng` given, so a `np.random.RandomState` seeded
as the official code reproduces its kernels, and a `np.random.Generator` gives our seeded ones.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

_EPS = 0.1  # the upstream algorithm's constant added to step scales and to the maximum angle


def motion_kernel(size: int, intensity: float, rng: np.random.Generator | np.random.RandomState) -> np.ndarray:
    """Draw one random motion-blur kernel.

    Args:
        size: kernel side in pixels (> 0).
        intensity: in [0, 1]; 0 gives a straight motion, 1 a long, strongly curved one.
        rng: source of randomness (`np.random.default_rng(seed)`; a `RandomState` also works).

    Returns:
        float32 array (size, size), non-negative, summing to 1.
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"motion_kernel: size must be a positive integer, got {size!r}")
    if not 0 <= intensity <= 1:
        raise ValueError(f"motion_kernel: intensity must be in [0, 1], got {intensity!r}")
    canvas = 2 * int(size)  # supersampled canvas side
    diagonal = math.hypot(canvas, canvas)
    path = _random_path(canvas, diagonal, float(intensity), rng)

    # Upstream's width int(diagonal / 150) is 0 below size 54, which PIL draws as nothing (an all-zero,
    # NaN kernel); at least 1 pixel changes only those sizes.
    width = max(1, int(diagonal / 150))
    image = Image.new("L", (canvas, canvas))
    ImageDraw.Draw(image).line(xy=[(p.real, p.imag) for p in path], fill=255, width=width)
    image = image.filter(ImageFilter.GaussianBlur(radius=int(diagonal * 0.01)))
    image = image.resize((size, size), resample=Image.LANCZOS)

    kernel = np.asarray(image, dtype=np.float32)
    total = np.sum(kernel)
    if total == 0:  # the path left the canvas: does not happen for the sizes and intensities in use
        raise RuntimeError(f"motion_kernel: the random path missed the {size}x{size} kernel; draw again")
    return kernel / total


def _random_path(canvas: int, diagonal: float, intensity: float, rng) -> np.ndarray:
    """Vertices of the motion path on the canvas, complex (x + iy), shape (num_steps,)."""
    steps = _step_lengths(diagonal, intensity, rng)
    angles = _step_angles(len(steps), intensity, rng)
    path = np.cumsum(steps * np.exp(1j * angles))
    centre_of_mass = np.cumsum(path)[-1] / len(path)  # sequential sum, as upstream
    path = (path - centre_of_mass) * np.exp(1j * rng.uniform(0, math.pi))
    return path + (canvas + 1j * canvas) / 2


def _step_lengths(diagonal: float, intensity: float, rng) -> np.ndarray:
    max_length = 0.75 * diagonal * (rng.uniform() + rng.uniform(0, intensity**2))
    steps, total = [], 0.0
    while total < max_length:
        step = rng.beta(1, 30) * (1 - intensity + _EPS) * diagonal
        if step < max_length:
            steps.append(step)
            total += step
    return np.asarray(steps)


def _step_angles(num_steps: int, intensity: float, rng) -> np.ndarray:
    max_angle = rng.uniform(0, intensity * math.pi)
    jitter = rng.beta(2, 20)  # probability that an angle flips the sign of the previous one
    angles = [rng.uniform(low=-max_angle, high=max_angle)]
    while len(angles) < num_steps:
        angle = rng.triangular(0, intensity * max_angle, max_angle + _EPS)
        sign = np.sign(angles[-1])
        angles.append(angle * (-sign if rng.uniform() < jitter else sign))
    return np.asarray(angles)
