"""Metric curves over the saved iterates (the official figures/metrics.png and avg_metrics.png).

Uses matplotlib's object API with the Agg canvas, so importing this module neither selects nor
changes the pyplot backend of the program that imports it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from util.image_io import atomic_path

Curve = Sequence[float] | np.ndarray


def _panels(lpips: object | None) -> list[str]:
    return ["PSNR (dB)", "SSIM"] + ([] if lpips is None else ["LPIPS"])


def _save(fig: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def save_metric_curves(
    psnr_list: Curve, ssim_list: Curve, lpips_list: Curve | None, path: str | os.PathLike, title: str = ""
) -> None:
    """Plot one image's PSNR, SSIM and (if not None) LPIPS against the saved-iterate index; atomic PNG.

    Each list holds one value per saved iterate (3 per outer iteration in the official layout: the
    data-consistency iterate after step 1, after step tau, and the purified image).
    """
    curves = [psnr_list, ssim_list] + ([] if lpips_list is None else [lpips_list])
    names = _panels(lpips_list)
    fig = Figure(figsize=(5 * len(names), 4), layout="constrained")
    for i, (name, values) in enumerate(zip(names, curves)):
        ax = fig.add_subplot(1, len(names), i + 1)
        ax.plot(np.asarray(values, dtype=np.float64), marker=".")
        ax.set(xlabel="saved iterate", title=f"{title} {name}".strip())
        ax.grid(alpha=0.3)
    _save(fig, path)


def save_average_metric_curves(
    psnr_all: np.ndarray, ssim_all: np.ndarray, lpips_all: np.ndarray | None, path: str | os.PathLike, title: str = ""
) -> None:
    """Plot the mean (line) and standard deviation (band) over images of each metric; atomic PNG.

    Each array is (N_images, N_iterates); `lpips_all` may be None.
    """
    curves = [psnr_all, ssim_all] + ([] if lpips_all is None else [lpips_all])
    names = _panels(lpips_all)
    fig = Figure(figsize=(5 * len(names), 4), layout="constrained")
    for i, (name, values) in enumerate(zip(names, curves)):
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 2:
            raise ValueError(f"cannot plot '{path}': {name} must be (N_images, N_iterates), got shape {v.shape}")
        mean, std = v.mean(axis=0), v.std(axis=0)
        steps = np.arange(v.shape[1])
        ax = fig.add_subplot(1, len(names), i + 1)
        ax.plot(steps, mean, marker=".")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
        ax.set(xlabel="saved iterate", title=f"{title} {name} (mean ± std over {v.shape[0]} images)".strip())
        ax.grid(alpha=0.3)
    _save(fig, path)
