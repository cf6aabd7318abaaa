"""Evaluate the demo tasks with the embedded demo prior and print a table.

    python scripts/eval_demo.py [--tasks super_resolution gaussian_deblur ...] [--max_images N]

For each demo task (super-resolution x4, Gaussian deblur, motion deblur, box inpainting, denoising;
measurement noise 0.05) it reports mean PSNR / SSIM over the held-out images in data/demo of
  (a) the measurement's simple baseline: bicubic upsampling, the blurred image, the masked image,
      the noisy image;
  (b) data consistency alone: the same solver and number of gradient steps, purification off;
  (c) DCDP with the demo prior;
with seconds per image. Runs go through dcdp.py, so the numbers are the driver's own.
"""
from __future__ import annotations

import argparse
import json
import platform
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


def run_task(task: str, args, purify: bool) -> dict:
    argv = ["--task_config", f"task_configurations/demo/{task}.yaml",
            "--purification_config", f"purification_configurations/demo/{task}.yaml",
            "--model_config", args.model_config, "--save_dir", args.save_dir, "--quiet", "--no_curves",
            "--device", args.device]
    if args.max_images:
        argv += ["--max_images", str(args.max_images)]
    if not purify:
        argv.append("--no_purification")
    code = dcdp.main(argv)
    if code != 0:
        raise SystemExit(f"dcdp.py failed on task {task} (exit {code})")
    run_dirs = sorted(Path(args.save_dir).glob("*/*/*/*/summary.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(run_dirs[-1].read_text())


def evaluate_baseline(summary: dict, task: str) -> dict:
    root = Path(summary["run_dir"])
    ps, ss = [], []
    for y_file in sorted((root / "measurements").glob("*.pt")):
        y = torch.load(y_file)
        gt = load_image(root / "label" / (y_file.stem + ".png"), "folder", None)[0]
        est = baseline_image(task, y, gt.shape[-1])
        ps.append(psnr(gt, est)[0])
        ss.append(ssim(gt, est)[0])
    return {"psnr": sum(ps) / len(ps), "ssim": sum(ss) / len(ss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--model_config", default="model_configurations/model_config_demo.yaml")
    p.add_argument("--save_dir", default="./results/eval_demo")
    p.add_argument("--max_images", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    rows = []
    for task in args.tasks:
        t0 = time.perf_counter()
        dc = run_task(task, args, purify=False)
        full = run_task(task, args, purify=True)
        base = evaluate_baseline(full, task)
        m_dc, m = dc["metrics"], full["metrics"]
        rows.append({
            "task": task, "baseline": BASELINE[task], "images": full["ok"],
            "baseline_psnr": base["psnr"], "baseline_ssim": base["ssim"],
            "dc_psnr": m_dc["psnr"]["mean"], "dc_ssim": m_dc["ssim"]["mean"], "dc_seconds": m_dc["seconds"]["mean"],
            "dcdp_psnr": m["psnr"]["mean"], "dcdp_ssim": m["ssim"]["mean"], "dcdp_seconds": m["seconds"]["mean"],
            "wall_seconds": time.perf_counter() - t0,
        })
    head = (f"| task | baseline | (a) PSNR / SSIM | (b) DC alone PSNR / SSIM | (c) DCDP PSNR / SSIM | "
            f"DCDP − max(a, b) dB | s/img (b) | s/img (c) |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        gain = r["dcdp_psnr"] - max(r["baseline_psnr"], r["dc_psnr"])
        lines.append(f"| {r['task']} | {r['baseline']} | {r['baseline_psnr']:.2f} / {r['baseline_ssim']:.3f} | "
                     f"{r['dc_psnr']:.2f} / {r['dc_ssim']:.3f} | {r['dcdp_psnr']:.2f} / {r['dcdp_ssim']:.3f} | "
                     f"{gain:+.2f} | {r['dc_seconds']:.1f} | {r['dcdp_seconds']:.1f} |")
    print(f"demo evaluation, {time.strftime('%Y-%m-%d')}, {platform.machine()} {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
