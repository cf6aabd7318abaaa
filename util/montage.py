"""Montages: ground truth | measurement | data consistency alone | DCDP result, PSNR / SSIM under each.

`write_run_montage(root)` makes a run's figures/montage.png from the files the run wrote: label/ (ground
truth), input/ (the measurement as a picture), dc/ (the last data-consistency iterate, before the last
purification) and recon/, for its first few restored images; the numbers under the DC and DCDP panels are the
images' records (psnr_before / ssim_before and psnr / ssim, computed on the unquantised tensors). A
measurement of the image's shape (blur, noise, a mask) gets its PSNR / SSIM against the saved ground truth;
another (a low-resolution image, Fourier magnitudes) is shown scaled to the image's size with its own size
under it. `save_montage` draws any such rows (collect_results.py --montage: one row per run).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from util.image_io import atomic_path

COLUMNS = ("ground truth", "measurement", "data consistency alone\n(last DC iterate)", "DCDP")
PANEL_INCHES = 2.6


@dataclass
class Panel:
    image: np.ndarray | None   # (H, W, 3) uint8, or None when the file is missing
    caption: str


def _read(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _scores(psnr, ssim) -> str:
    if psnr is None or ssim is None:
        return "–"
    return f"PSNR {float(psnr):.2f} dB / SSIM {float(ssim):.3f}"


def _measurement(root: Path, name: str, gt: np.ndarray | None) -> Panel:
    """The measurement panel: the picture in input/, with its PSNR / SSIM when it has the image's shape."""
    import torch

    from util.metrics import psnr, ssim

    picture = _read(root / "input" / f"{name}.png")
    y_file = root / "measurements" / f"{name}.pt"
    if picture is None or gt is None:
        return Panel(picture, "–")
    h, w = picture.shape[:2]
    y = torch.load(y_file, map_location="cpu", weights_only=True) if y_file.is_file() else None
    if y is not None and not y.is_complex() and tuple(y.shape) == (3, *gt.shape[:2]):
        x = torch.from_numpy(gt.copy()).permute(2, 0, 1).float() / 127.5 - 1  # as load_image maps 8-bit values
        return Panel(picture, _scores(psnr(x, y.float())[0], ssim(x, y.float())[0]))
    if (h, w) != gt.shape[:2]:  # shown at the image's size, nearest neighbour (no smoothing that is not there)
        picture = np.asarray(Image.fromarray(picture).resize(gt.shape[1::-1], Image.NEAREST))
    return Panel(picture, f"{w}×{h} (shown at {gt.shape[1]}×{gt.shape[0]})")


def run_panels(root: Path, record: dict) -> list[Panel]:
    """The four panels of one image of a run folder, from its record (metrics/{index}.json)."""
    name = f"{int(record['index']):05d}"
    gt = _read(root / "label" / f"{name}.png")
    return [Panel(gt, Path(str(record.get("file", name))).name),
            _measurement(root, name, gt),
            Panel(_read(root / "dc" / f"{name}.png"), _scores(record.get("psnr_before"), record.get("ssim_before"))),
            Panel(_read(root / "recon" / f"{name}.png"), _scores(record.get("psnr"), record.get("ssim")))]


def restored_records(root: Path, limit: int) -> list[dict]:
    """The records of the first `limit` restored images of a run (by index)."""
    records = []
    for path in sorted((root / "metrics").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if record.get("status") == "ok":
            records.append(record)
        if len(records) == limit:
            break
    return records


def save_montage(rows: list[list[Panel]], path: Path, row_labels: list[str] | None = None, title: str = "") -> None:
    """Draw rows of four panels (COLUMNS) with the caption under each image; atomic PNG.

    Images keep their aspect ratio (no squashing); each panel is PANEL_INCHES wide at 100 dpi."""
    n = len(rows)
    fig = Figure(figsize=(PANEL_INCHES * len(COLUMNS) + (0.4 if row_labels else 0), PANEL_INCHES * n + 0.9),
                 layout="constrained")
    for r, panels in enumerate(rows):
        for c, panel in enumerate(panels):
            ax = fig.add_subplot(n, len(COLUMNS), r * len(COLUMNS) + c + 1)
            if panel.image is not None:
                ax.imshow(panel.image, interpolation="nearest", aspect="equal")
            else:
                ax.text(0.5, 0.5, "not saved", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(panel.caption, fontsize=8.5)
            if r == 0:
                ax.set_title(COLUMNS[c], fontsize=10)
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_run_montage(root: Path, limit: int = 4) -> Path | None:
    """figures/montage.png of a run folder: its first `limit` restored images (None if there is none)."""
    records = restored_records(root, limit)
    if not records:
        return None
    path = root / "figures" / "montage.png"
    save_montage([run_panels(root, r) for r in records], path, title=f"{root.parent.parent.parent.name}: {root.name}")
    return path
