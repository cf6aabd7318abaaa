"""Gather finished dcdp.py runs into one table (PSNR / SSIM / LPIPS as mean ± std, per run).

    python scripts/collect_results.py                          # every run under ./purification_results
    python scripts/collect_results.py results/ other_results/ --csv table.csv --json table.json

Every `summary.json` below the given folders is one row: task (operator), dataset, measurement noise σ,
prior (model checkpoint), K, τ, purification (full DDIM or Tweedie), images restored / failed, the
metrics after the final purification, and seconds per image. Rows are sorted by task, dataset and σ.
The markdown table goes to stdout; --csv and --json write the same rows to files.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

COLUMNS = ("task", "dataset", "sigma", "prior", "K", "tau", "purification", "images", "failed",
           "psnr", "psnr_std", "ssim", "ssim_std", "lpips", "lpips_std", "seconds_per_image", "run_dir")


def row_of(summary: dict, path: Path) -> dict:
    """One table row from a run's summary.json."""
    resolved = summary.get("resolved", {})
    task = resolved.get("task", {})
    pur = resolved.get("purification", {})
    model = resolved.get("model", {})
    metrics = summary.get("metrics", {})

    def stat(name: str, key: str):
        value = metrics.get(name, {}).get(key)
        return None if value is None else float(value)

    if resolved.get("no_purification"):
        purification = "none (data consistency alone)"
    else:
        purification = (f"DDIM {pur.get('ddim_num_iterations', 20)}" if pur.get("full_ddim", True) else "Tweedie")
    checkpoint = Path(str(model["model_path"])) if model.get("model_path") else None
    if checkpoint is not None:  # generic file names (model.ckpt) are told apart by their folder
        checkpoint = f"{checkpoint.parent.name}/{checkpoint.name}" if checkpoint.stem == "model" else checkpoint.name
    return {
        "task": task.get("operator", {}).get("name", "?"),
        "dataset": resolved.get("dataset", {}).get("name", "?"),
        "sigma": task.get("noise", {}).get("sigma", 0.0),
        "prior": checkpoint or "random weights",
        "K": pur.get("total_num_iterations"), "tau": pur.get("csgm_num_iterations"),
        "purification": purification,
        "images": summary.get("ok", 0), "failed": summary.get("failed", 0),
        "psnr": stat("psnr", "mean"), "psnr_std": stat("psnr", "std"),
        "ssim": stat("ssim", "mean"), "ssim_std": stat("ssim", "std"),
        "lpips": stat("lpips", "mean"), "lpips_std": stat("lpips", "std"),
        "seconds_per_image": stat("seconds", "mean"),
        "run_dir": str(path.parent),
    }


def collect(folders: list[Path]) -> list[dict]:
    rows = []
    for folder in folders:
        if not folder.is_dir():
            raise SystemExit(f"error: '{folder}' is not a folder; give the --save_dir of your dcdp.py runs")
        for path in sorted(folder.rglob("summary.json")):
            try:
                summary = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                print(f"skipping '{path}': not a readable summary ({exc.__class__.__name__})", file=sys.stderr)
                continue
            rows.append(row_of(summary, path))
    return sorted(rows, key=lambda r: (r["task"], r["dataset"], float(r["sigma"] or 0), r["run_dir"]))


def _pm(mean, std, digits: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| task | dataset | σ | prior | K × τ | purification | images (failed) | PSNR | SSIM | LPIPS | s/img |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = "–" if r["seconds_per_image"] is None else f"{r['seconds_per_image']:.1f}"
        lines.append(f"| {r['task']} | {r['dataset']} | {r['sigma']} | {r['prior']} | {r['K']} × {r['tau']} | "
                     f"{r['purification']} | {r['images']} ({r['failed']}) | {_pm(r['psnr'], r['psnr_std'], 2)} | "
                     f"{_pm(r['ssim'], r['ssim_std'], 3)} | {_pm(r['lpips'], r['lpips_std'], 3)} | {seconds} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", default=["./purification_results"], help="--save_dir folders of dcdp.py runs")
    p.add_argument("--csv", default=None, help="also write the rows as CSV here")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    rows = collect([Path(f) for f in args.folders])
    if not rows:
        print(f"no finished runs (summary.json) under {', '.join(args.folders)}", file=sys.stderr)
        return 1
    print(markdown(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
