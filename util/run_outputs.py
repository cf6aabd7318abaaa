"""Everything a run writes, in one place: the run folder, per-image files and the merged summaries.

Every file is written atomically (temp file + rename), so a run killed at any moment leaves each
file either complete or absent. Per-image results live in `metrics/{index:05d}.json`; `metrics.csv`
and `summary.json` are rebuilt from the records of exactly the images the run selected, which makes
resuming and multi-process runs simple. A run folder holds one configuration: its name ends with a
short hash of the run's identity (`run_config.json`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Optional

import torch

from util.image_io import atomic_save_torch, atomic_write_text, save_image, save_normalized

log = logging.getLogger("dcdp")

CSV_COLUMNS = (
    "index", "file", "status", "reason", "psnr_before", "ssim_before", "lpips_before", "psnr", "ssim", "lpips",
    "seconds", "nfe", "dc_steps",
)
SUBDIRS = ("input", "recon", "label", "dc", "measurements", "states", "metrics", "figures")


def identity_hash(identity: dict) -> str:
    """A short hash of a run's identity (everything that changes its numbers)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_dir_name(save_dir: str, operator_name: str, dataset_name: str, sigma: float, s, full_ddim: bool,
                 ddim_num_iterations: int, suffix: str = "", identity: Optional[dict] = None) -> Path:
    """The official layout, {save_dir}/{op}/{dataset}/noise_std_{σ}/{T_init}_{T_end}_{K}_{τ}_{schedule}_{lr}_
    {momentum}_{full_ddim}_{n}_{λ}, then our suffixes and the identity hash: `_{hash8}`."""
    sigma_str = f"{sigma:g}"
    lr = int(s.lr) if float(s.lr).is_integer() else s.lr
    leaf = (f"{s.T_init}_{s.T_end}_{s.K}_{s.tau}_{s.schedule}_{lr}_{s.momentum}_{full_ddim}_"
            f"{ddim_num_iterations}_{s.weight_decay_lambda:g}")
    if suffix:
        leaf += f"_{suffix}"
    if not s.purify:
        leaf += "_no_purification"
    if identity is not None:
        leaf += f"_{identity_hash(identity)}"
    return Path(save_dir) / operator_name / dataset_name / f"noise_std_{sigma_str}" / leaf


def make_dirs(root: Path, save_iterates: bool, ground_truth: bool = True) -> None:
    """The run folder's sub-folders; a run without ground truth has no label/ or dc/ (nor a montage)."""
    for sub in SUBDIRS + (("iterates",) if save_iterates else ()):
        if ground_truth or sub not in ("label", "dc"):
            (root / sub).mkdir(parents=True, exist_ok=True)


def stem(index: int) -> str:
    return f"{index:05d}"


def image_complete(root: Path, index: int, file=None) -> bool:
    """An image is done when its metrics record exists (written last, after every other file) and,
    when `file` is given, names that file."""
    path = root / "metrics" / f"{stem(index)}.json"
    if not path.is_file():
        return False
    if file is None:
        return True
    try:
        return json.loads(path.read_text()).get("file") == str(file)
    except (OSError, json.JSONDecodeError):
        return False


def save_image_outputs(root: Path, index: int, gt: Optional[torch.Tensor], y: torch.Tensor, recon: Optional[torch.Tensor],
                       state: dict, iterates: Optional[list], log_scale: bool = False,
                       dc: Optional[torch.Tensor] = None) -> None:
    """Write one image's pictures and tensors (not its metrics record). Tensors are (3, H, W).

    `dc` is the last data-consistency iterate (before the last purification), saved in dc/ for the montage.

    A measurement that is not an image (phase retrieval's Fourier magnitudes) is shown normalised,
    on a log scale (log(1 + |y|)) with `log_scale`.
    """
    name = stem(index)
    if gt is not None:  # None: a measurement given without ground truth
        save_image(gt, root / "label" / f"{name}.png")
    if log_scale:
        save_normalized(torch.log1p(y.abs()), root / "input" / f"{name}.png")
    elif y.dim() == 3 and y.shape[0] == 3 and y.min() >= -1.5 and y.max() <= 1.5:
        save_image(y, root / "input" / f"{name}.png")
    else:
        save_normalized(y, root / "input" / f"{name}.png")
    atomic_save_torch(y.cpu(), root / "measurements" / f"{name}.pt")
    if state:
        atomic_save_torch({k: v.cpu() for k, v in state.items()}, root / "states" / f"{name}.pt")
    if recon is not None:
        save_image(recon, root / "recon" / f"{name}.png")
    if dc is not None:
        save_image(dc, root / "dc" / f"{name}.png")
    if iterates is not None:
        atomic_save_torch(iterates, root / "iterates" / f"{name}.pt")


def image_record(index: int, file, seconds: float, nfe: int, dc_steps: int, failed_at, what: str = "image") -> dict:
    """An image's record after the loop: ok, or failed when its iterate became NaN/Inf at outer iteration
    `failed_at` (one warning line then); the caller adds the metrics of an ok image."""
    rec = {"index": index, "file": str(file), "status": "ok", "reason": "", "seconds": round(seconds, 3),
           "nfe": nfe, "dc_steps": dc_steps}
    if failed_at is not None:
        rec.update(status="failed", reason=f"non-finite iterate (NaN/Inf) at outer iteration {failed_at}")
        log.warning(f"{what} {index} ({file}): diverged at outer iteration {failed_at}; continuing")
    return rec


def record_failure(root: Path, index: int, file, reason: str, what: str = "image") -> dict:
    """Image `index` failed for `reason`: one warning line, and its record (written, then returned)."""
    log.warning(f"{what} {index} ({file}): {reason}; continuing")
    rec = {"index": index, "file": str(file), "status": "failed", "reason": reason}
    write_record(root, rec)
    return rec


def write_record(root: Path, record: dict) -> None:
    """Write one image's record; non-finite numbers (PSNR of a perfect result is inf) become strings."""
    record = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    atomic_write_text(root / "metrics" / f"{stem(record['index'])}.json", json.dumps(record, indent=1))


def read_records(root: Path) -> list[dict]:
    """Every readable record of the folder; an unreadable one is skipped with a warning."""
    records = []
    for p in sorted((root / "metrics").glob("*.json")):
        try:
            records.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning(f"warning: skipping the unreadable record '{p}' ({type(exc).__name__}); rerun with --resume "
                        f"to redo that image")
    return sorted(records, key=lambda r: r["index"])


def _stats(values: list) -> dict:
    vals = [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "n": len(vals)}


METRIC_KEYS = ("psnr", "ssim", "lpips", "psnr_before", "ssim_before", "lpips_before", "seconds")


def write_summaries(root: Path, meta: dict, selected: Optional[dict] = None, columns: tuple = CSV_COLUMNS,
                    metric_keys: tuple = METRIC_KEYS) -> dict:
    """Rebuild metrics.csv and summary.json from the per-image records; returns the summary.

    `selected` ({index: file}) are the images of this run: only their records count (a record of
    another file at that index, or of an index outside the run, is left out), and those without a
    record are counted as `missing` (not done yet: an interrupted run). `columns` and `metric_keys`: the
    CSV's columns and the summarised numbers (a run without ground truth has residuals instead of PSNR).
    """
    records = read_records(root)
    missing = 0
    if selected is not None:
        records = [r for r in records if selected.get(r.get("index")) == r.get("file")]
        missing = len(selected) - len(records)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    atomic_write_text(root / "metrics.csv", buf.getvalue())
    ok = [r for r in records if r.get("status") == "ok"]
    summary = dict(meta)
    summary.update({
        "images": len(records) + missing,
        "done": len(records),
        "missing": missing,
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "failures": [{"index": r["index"], "file": r.get("file"), "reason": r.get("reason")} for r in records
                     if r.get("status") != "ok"],
        "metrics": {key: _stats([r.get(key) for r in ok]) for key in metric_keys},
    })
    lpips_info = summary.get("metrics_provenance", {}).get("lpips")
    if isinstance(lpips_info, dict):  # --resume may have joined records of another --lpips: say which
        nets = [r.get("lpips_net") or "none" for r in ok]
        lpips_info["records_by_net"] = {net: nets.count(net) for net in sorted(set(nets))}
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=1))
    return summary
