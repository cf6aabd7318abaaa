"""Metric curves (the official figures/metrics.png and avg_metrics.png).

`save_metric_curves`: one image's metrics per round k = 1..K of DCDP, two series (after data consistency,
after purification). `save_average_metric_curves`: mean ± std over images per saved iterate.

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


SERIES = ("after data consistency", "after purification")


def split_rounds(values: Curve, name: str = "values") -> tuple[np.ndarray, np.ndarray]:
    """Split a per-round curve that alternates (after data consistency, after purification) for k = 1..K
    into its two series. An odd length means the last round has its data-consistency value only (a run
    stopped before that round's purification); its purified series is one shorter."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name}: expected a flat list of per-round values, got shape {v.shape}")
    return v[0::2], v[1::2]


def save_metric_curves(
    psnr_list: Curve, ssim_list: Curve, lpips_list: Curve | None, path: str | os.PathLike, title: str = ""
) -> None:
    """Plot one image's PSNR, SSIM and (if not None) LPIPS per round of DCDP; atomic PNG.

    Each list alternates per round: the value after data consistency, then the value after purification,
    for rounds k = 1..K (2K values; an odd count means the last round was not purified, see
    `split_rounds`). Each panel has the two series, labelled, against the round k, counted from 1 (x axis
    "round k"). `title` (e.g. the image's file name) heads the figure.
    """
    from matplotlib.ticker import MaxNLocator

    curves = [psnr_list, ssim_list] + ([] if lpips_list is None else [lpips_list])
    names = _panels(lpips_list)
    lengths = {name: len(values) for name, values in zip(names, curves)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"cannot plot '{path}': the metric lists differ in length ({lengths}); each holds two "
                         f"values per round (after data consistency, after purification)")
    fig = Figure(figsize=(4.6 * len(names), 3.8), layout="constrained")
    for i, (name, values) in enumerate(zip(names, curves)):
        ax = fig.add_subplot(1, len(names), i + 1)
        dense = len(values) > 80  # more than 40 rounds (phase retrieval: 200): lines without markers
        for series, style in zip(split_rounds(values, name), (dict(marker="o", ls="--", color="tab:blue"),
                                                               dict(marker="s", ls="-", color="tab:orange"))):
            ax.plot(np.arange(1, len(series) + 1), series, markersize=0 if dense else 4, lw=1.3, **style)
        ax.set(xlabel="round k", ylabel=name, title=name)
        rounds = (len(values) + 1) // 2
        if rounds <= 20:
            ax.set_xlim(0.5, max(rounds, 1) + 0.5)  # a few rounds: whole numbers only, even for K = 1
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    handles = fig.axes[0].get_lines()
    fig.legend(handles, SERIES, loc="outside lower center", ncols=2, frameon=False)
    if title:
        fig.suptitle(title)
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
