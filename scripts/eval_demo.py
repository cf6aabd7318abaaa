"""Evaluate the demo tasks with the embedded demo prior over seeds and print a table.

    python scripts/eval_demo.py [--tasks super_resolution gaussian_deblur ...] [--max_images N]
                                [--seeds 0 1 2] [--out table.md]

For each demo task (super-resolution x4, Gaussian deblur, motion deblur, box inpainting, denoising;
measurement noise 0.05) and each seed S (the driver's --seed S: image i uses the seed S + i) it reports
mean ± std over images x seeds of PSNR / SSIM on the held-out images in data/demo of
  (a) the measurement's simple baseline: bicubic upsampling, the blurred image, the masked image,
      the noisy image;
  (b) data consistency alone: the same solver and number of gradient steps, purification off;
  (c) DCDP with the demo prior;
with network evaluations (NFE) per image and seconds per image, and below the table DCDP's mean over the
images at each seed (the seed-0 means are what tests/test_demo_numbers.py pins). Runs go through dcdp.py (one fresh
--save_dir per run, so each run's summary.json is found whatever the run folder is named), so the
numbers are the driver's own. --out FILE writes the table as markdown (FILE.md) or JSON (FILE.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dcdp  # noqa: E402
from util.image_io import load_image  # noqa: E402
from util.metrics import psnr, ssim  # noqa: E402

TASKS = ("super_resolution", "gaussian_deblur", "motion_deblur", "inpainting", "denoising")
BASELINE = {"super_resolution": "bicubic upsampling", "gaussian_deblur": "blurred image",
            "motion_deblur": "blurred image", "inpainting": "masked image", "denoising": "noisy image"}


def baseline_image(task: str, y: torch.Tensor, size: int) -> torch.Tensor:
    """The simple estimate from the measurement alone, (3, H, W) in [-1, 1]."""
    if task == "super_resolution":
        return F.interpolate(y[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(-1, 1)
    return y.clamp(-1, 1)


def run_task(task: str, args, purify: bool, seed: int) -> dict:
    """One dcdp.py run; returns its summary.json and per-image records."""
    save_dir = Path(args.save_dir) / f"{task}_{'dcdp' if purify else 'dc'}_seed{seed}"
    if save_dir.exists():
        shutil.rmtree(save_dir)
    argv = ["--task_config", f"task_configurations/demo/{task}.yaml",
            "--purification_config", f"purification_configurations/demo/{task}.yaml",
            "--model_config", args.model_config, "--save_dir", str(save_dir), "--quiet", "--no_curves",
            "--device", args.device, "--seed", str(seed)]
    if args.max_images:
        argv += ["--max_images", str(args.max_images)]
    if not purify:
        argv.append("--no_purification")
    code = dcdp.main(argv)
    if code != 0:
        raise SystemExit(f"dcdp.py failed on task {task}, seed {seed} (exit {code})")
    found = sorted(save_dir.rglob("summary.json"))
    if len(found) != 1:
        raise SystemExit(f"expected one summary.json under {save_dir}, found {len(found)}")
    summary = json.loads(found[0].read_text())
    summary.setdefault("run_dir", str(found[0].parent))
    return summary


def image_records(summary: dict) -> list[dict]:
    """The per-image records of a run (records/*.json or the summary's own list)."""
    root = Path(summary["run_dir"])
    recs = [json.loads(f.read_text()) for f in sorted(root.rglob("*.json"))
            if f.name != "summary.json" and f.parent != root]
    recs = [r for r in recs if isinstance(r, dict) and "status" in r and "index" in r]
    if not recs and isinstance(summary.get("images"), list):
        recs = summary["images"]
    ok = [r for r in recs if r.get("status") == "ok"]
    if not ok:
        raise SystemExit(f"no restored image in {root}")
    return ok


def evaluate_baseline(summary: dict, task: str) -> list[tuple[float, float]]:
    root = Path(summary["run_dir"])
    out = []
    for y_file in sorted((root / "measurements").glob("*.pt")):
        y = torch.load(y_file)
        gt = load_image(root / "label" / (y_file.stem + ".png"), "folder", None)[0]
        est = baseline_image(task, y, gt.shape[-1])
        out.append((psnr(gt, est)[0], ssim(gt, est)[0]))
    return out


def mean_std(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def pm(ms, digits: int) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="driver seeds (image i of a run with --seed S uses S + i); default 0 1 2")
    p.add_argument("--model_config", default="model_configurations/model_config_demo.yaml")
    p.add_argument("--save_dir", default="./results/eval_demo")
    p.add_argument("--max_images", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="also write the table here: markdown (.md) or JSON (.json)")
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)  # older name of --out FILE.json
    args = p.parse_args(argv)
    rows = []
    for task in args.tasks:
        t0 = time.perf_counter()
        base, dc, full, by_seed = [], [], [], {}
        for seed in args.seeds:
            s_dc = run_task(task, args, purify=False, seed=seed)
            s_full = run_task(task, args, purify=True, seed=seed)
            base += evaluate_baseline(s_full, task)
            dc += image_records(s_dc)
            recs = image_records(s_full)
            full += recs
            by_seed[seed] = (statistics.fmean(r["psnr"] for r in recs), statistics.fmean(r["ssim"] for r in recs))
        rows.append({
            "task": task, "baseline": BASELINE[task], "images": len(full) // len(args.seeds),
            "seeds": args.seeds, "samples": len(full),
            "baseline_psnr": mean_std(b[0] for b in base), "baseline_ssim": mean_std(b[1] for b in base),
            "dc_psnr": mean_std(r["psnr"] for r in dc), "dc_ssim": mean_std(r["ssim"] for r in dc),
            "dc_seconds": statistics.fmean(r["seconds"] for r in dc),
            "dcdp_psnr": mean_std(r["psnr"] for r in full), "dcdp_ssim": mean_std(r["ssim"] for r in full),
            "dcdp_seconds": statistics.fmean(r["seconds"] for r in full),
            "nfe": statistics.fmean(r.get("nfe", 0) for r in full),
            "dc_steps": statistics.fmean(r.get("dc_steps", 0) for r in full),
            "dcdp_by_seed": by_seed,   # seed -> (mean PSNR, mean SSIM) over the images: what the tests pin
            "wall_seconds": time.perf_counter() - t0,
        })
    head = ("| task | (a) baseline | (a) PSNR / SSIM | (b) DC alone PSNR / SSIM | (c) DCDP PSNR / SSIM | "
            "DCDP − max(a, b) | NFE/img (c) | s/img (b) | s/img (c) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        gain = r["dcdp_psnr"][0] - max(r["baseline_psnr"][0], r["dc_psnr"][0])
        lines.append(f"| {r['task'].replace('_', ' ')} | {r['baseline']} | {pm(r['baseline_psnr'], 2)} / {pm(r['baseline_ssim'], 3)} | "
                     f"{pm(r['dc_psnr'], 2)} / {pm(r['dc_ssim'], 3)} | **{pm(r['dcdp_psnr'], 2)}** / {pm(r['dcdp_ssim'], 3)} | "
                     f"{gain:+.2f} dB | {r['nfe']:.0f} | {r['dc_seconds']:.1f} | {r['dcdp_seconds']:.1f} |")
    title = (f"demo evaluation, {time.strftime('%Y-%m-%d')}, {platform.machine()} {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}; mean ± std over images × seeds {' '.join(map(str, args.seeds))}")
    lines += ["", "DCDP per seed, mean over the images (PSNR / SSIM): " + "; ".join(
        f"{r['task']} " + ", ".join(f"seed {k} {p:.2f} / {q:.3f}" for k, (p, q) in r["dcdp_by_seed"].items())
        for r in rows)]
    print(title)
    print("\n".join(lines))
    out = args.out or args.json
    if out:
        if str(out).endswith(".json"):
            Path(out).write_text(json.dumps({"title": title, "rows": rows}, indent=1))
        else:
            Path(out).write_text(title + "\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
