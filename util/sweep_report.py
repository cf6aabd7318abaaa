"""The sweep folder's table and plots (runner/sweep.py runs the grid).

sweep.csv / sweep.md: one row per grid point: the swept values as columns, status and reason, images
restored (failed), PSNR / SSIM / LPIPS mean ± std over the point's images, seconds per image, network
evaluations (NFE) per image, and the best row (highest mean PSNR among the points whose images all
succeeded) marked. sweep.json: the same rows with their run folders, plus the axes.
plot_{key}.png: per swept parameter, mean ± std (error bars) of PSNR and SSIM (and LPIPS when present)
against its values, one line per combination of the other axes' values; a log x axis when the values are
positive numbers spanning two decades or more. heatmap.png: with exactly two axes, mean PSNR and SSIM
over the grid, each cell labelled.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from util.image_io import atomic_path, atomic_write_text
from util.metrics import PROTOCOL, lpips_net_of

METRICS = ("psnr", "ssim", "lpips")
LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}
DIGITS = {"psnr": 2, "ssim": 3, "lpips": 3}


def _number(value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def metrics_of_run(root: Path) -> tuple[dict, dict]:
    """(summary.json, row metrics) of a finished run folder: means and stds from the summary, NFE per image
    from metrics.csv (the rows of exactly the run's images)."""
    summary = json.loads((root / "summary.json").read_text())
    m = summary.get("metrics", {})
    row = {"images": summary.get("ok", 0), "failed": summary.get("failed", 0)}
    for key in METRICS:
        row[key], row[f"{key}_std"] = m.get(key, {}).get("mean"), m.get(key, {}).get("std")
    row["seconds_per_image"] = m.get("seconds", {}).get("mean")
    row["lpips_net"] = lpips_net_of(summary)
    nfe = []
    if (root / "metrics.csv").is_file():
        with open(root / "metrics.csv", newline="") as f:
            nfe = [_number(r["nfe"]) for r in csv.DictReader(f) if r.get("status") == "ok"]
    nfe = [v for v in nfe if v is not None]
    row["nfe"] = statistics.fmean(nfe) if nfe else None
    return summary, row


def best_index(rows: list[dict]):
    """The row with the highest mean PSNR among the fully successful points (None if there is none)."""
    ok = [(r["psnr"], i) for i, r in enumerate(rows) if r["status"] == "ok" and r.get("psnr") is not None]
    return max(ok)[1] if ok else None


def table_rows(axes, rows: list[dict]) -> list[dict]:
    best = best_index(rows)
    out = []
    for i, r in enumerate(rows):
        flat = {a.key: r["point"][a.key] for a in axes}
        flat.update({k: r.get(k) for k in ("status", "reason", "images", "failed", "psnr", "psnr_std", "ssim",
                                           "ssim_std", "lpips", "lpips_std", "lpips_net", "seconds_per_image", "nfe",
                                           "run_dir")})
        flat["best"] = int(i == best)
        out.append(flat)
    return out


def _pm(mean, std, digits: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def markdown(axes, flat: list[dict], total: int) -> str:
    head = [a.key for a in axes] + ["status", "images (failed)", "PSNR", "SSIM", "LPIPS", "s/img", "NFE", "best"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in flat:
        status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        seconds = "–" if r["seconds_per_image"] is None else f"{r['seconds_per_image']:.2f}"
        nfe = "–" if r["nfe"] is None else f"{r['nfe']:.0f}"
        images = "–" if r["images"] is None else f"{r['images']} ({r['failed']})"
        metrics = [_pm(r[k], r[f"{k}_std"], DIGITS[k]) for k in METRICS]
        if r["lpips"] is not None:
            metrics[-1] += f" ({r['lpips_net']})"
        cells = [r[a.key] for a in axes] + [status.replace("|", "/"), images] + metrics + [
            seconds, nfe, "**best**" if r["best"] else ""]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if len(flat) < total:
        lines.append(f"\n{total - len(flat)} of {total} point(s) not run yet (rerun the sweep with --resume).")
    lines.append("\nbest: the highest mean PSNR among the points whose images all succeeded; mean ± std over the "
                 "point's images. " + PROTOCOL)
    return "\n".join(lines) + "\n"


def write_report(folder: Path, axes, points: list[dict], rows: list[dict], base: list | None = None) -> None:
    """Write sweep.json, sweep.csv, sweep.md and the plots of the points run so far."""
    folder.mkdir(parents=True, exist_ok=True)
    flat = table_rows(axes, rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(flat[0]) if flat else [a.key for a in axes], lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    atomic_write_text(folder / "sweep.csv", buf.getvalue())
    atomic_write_text(folder / "sweep.md", markdown(axes, flat, len(points)))
    atomic_write_text(folder / "sweep.json", json.dumps(
        {"axes": {a.key: list(a.values) for a in axes}, "overrides": base or [], "points": len(points),
         "rows": flat}, indent=1))
    for axis in axes:
        plot_axis(folder / f"plot_{axis.key}.png", axes, axis, flat)
    if len(axes) == 2:
        heatmap(folder / "heatmap.png", axes, flat)


def _positions(values: tuple) -> tuple[np.ndarray, bool, bool]:
    """x positions of an axis's values, whether they are numbers, whether the axis should be logarithmic."""
    nums = [_number(v) for v in values]
    if any(v is None for v in nums):
        return np.arange(len(values), dtype=float), False, False
    x = np.asarray(nums)
    log = bool((x > 0).all() and x.max() / x.min() >= 100)
    return x, True, log


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_axis(path: Path, axes, axis, flat: list[dict]) -> None:
    """Mean ± std of each metric against `axis`'s values, one line per combination of the other axes."""
    metrics = [k for k in METRICS if any(r[k] is not None for r in flat)] or ["psnr"]
    x, numeric, log = _positions(axis.values)
    others = [a for a in axes if a is not axis]
    groups = {}
    for r in flat:
        groups.setdefault(tuple(r[a.key] for a in others), []).append(r)
    fig = Figure(figsize=(4.6 * len(metrics), 3.8), layout="constrained")
    for j, key in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), j + 1)
        for label, members in groups.items():
            by_value = {r[axis.key]: r for r in members if r[key] is not None}
            idx = [i for i, v in enumerate(axis.values) if v in by_value]
            mean = [by_value[axis.values[i]][key] for i in idx]
            std = [by_value[axis.values[i]][f"{key}_std"] or 0.0 for i in idx]
            name = ", ".join(f"{a.key.split('.')[-1]}={v}" for a, v in zip(others, label)) or None
            ax.errorbar(x[idx], mean, yerr=std, marker="o", capsize=3, lw=1.3, label=name)
        if log:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(x, axis.values)
        ax.set(xlabel=axis.key, ylabel=LABELS[key], title=f"{LABELS[key]} (mean ± std)")
        ax.grid(alpha=0.3)
    if others and len(groups) <= 10:
        fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(groups), 4),
                   frameon=False)
    _save(fig, path)


def heatmap(path: Path, axes, flat: list[dict]) -> None:
    """Mean PSNR and SSIM over a two-parameter grid (rows: first axis, columns: second), cells labelled."""
    a, b = axes
    fig = Figure(figsize=(4.4 * 2 + 1, 0.5 * len(a.values) + 2.8), layout="constrained")
    for j, key in enumerate(("psnr", "ssim")):
        grid = np.full((len(a.values), len(b.values)), np.nan)
        for r in flat:
            if r[key] is not None:
                grid[a.values.index(r[a.key]), b.values.index(r[b.key])] = r[key]
        ax = fig.add_subplot(1, 2, j + 1)
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax, label=LABELS[key])
        for (i, k), v in np.ndenumerate(grid):
            if np.isfinite(v):  # dark text on the bright end of viridis
                bright = image.norm(v) > 0.6
                ax.text(k, i, f"{v:.{DIGITS[key]}f}", ha="center", va="center", fontsize=9,
                        color="black" if bright else "white")
        ax.set_xticks(range(len(b.values)), b.values)
        ax.set_yticks(range(len(a.values)), a.values)
        ax.set(xlabel=b.key, ylabel=a.key, title=f"mean {LABELS[key]}")
    _save(fig, path)
