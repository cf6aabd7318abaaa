"""Restoring a run's images: the batch loop (resume, batch halving on out-of-memory, Ctrl-C, per-image
failures), one batch through the DCDP loop, and the run's records and summaries."""
from __future__ import annotations

import logging
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from util.cli import EXIT_FAILED_IMAGES, EXIT_INTERRUPTED

from .context import RunContext
from .distributed import Distributed

log = logging.getLogger("dcdp")


def versions() -> dict:
    import numpy
    import skimage

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "scikit-image": skimage.__version__}


def restore_all(ctx: RunContext, dist: "Distributed") -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from util import run_outputs as out
    from util.metrics import LPIPS

    args = ctx.args
    indices = dist.shard(ctx.selected)
    todo = [i for i in indices if not (args.resume and out.image_complete(ctx.root, i, ctx.files[i]))]
    if len(todo) < len(indices):
        log.info(f"resume: {len(indices) - len(todo)} image(s) already complete, {len(todo)} to do")
    log.info(f"{len(ctx.selected)} image(s) from '{ctx.data_root}' → {ctx.root}  (device {ctx.device}, prior "
             f"{ctx.prior_info['kind']})")
    given = None  # the module of the no-ground-truth mode (--measurements): its batch, columns and summary line
    if ctx.measurements is not None:
        from runner import measurement_restore as given
    restore = given.restore_batch if given else restore_batch
    lpips = None if given else LPIPS(ctx.device, net=args.lpips)  # no ground truth: no LPIPS
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=args.quiet, file=sys.stderr)
    batch_size = args.batch_size or 1
    psnr_running: list[float] = []
    pos = 0
    interrupted = False
    with logging_redirect_tqdm():  # the root logger, whose handler prints: log lines above the bar, once
        try:
            while pos < len(todo):
                batch = todo[pos: pos + batch_size]
                try:
                    done = restore(ctx, batch, lpips)
                except torch.cuda.OutOfMemoryError:
                    if batch_size == 1:
                        raise
                    torch.cuda.empty_cache()
                    batch_size = max(1, batch_size // 2)
                    log.warning(f"out of GPU memory: retrying with --batch_size {batch_size}")
                    continue
                psnr_running += [r["psnr"] for r in done if r.get("psnr") is not None]
                pos += len(batch)
                bar.update(len(batch))
                if psnr_running:
                    bar.set_postfix(psnr=f"{sum(psnr_running) / len(psnr_running):.2f}")
        except KeyboardInterrupt:
            interrupted = True
    bar.close()
    if interrupted:
        finished = len(indices) - len(todo) + pos
        log.error(f"interrupted after {finished} of {len(indices)} images; rerun the same command with --resume to "
                  f"finish the others")
    else:
        dist.barrier()
    code = EXIT_INTERRUPTED if interrupted else 0
    if dist.rank == 0 or interrupted:
        no_gt = {"columns": given.CSV_COLUMNS, "metric_keys": given.METRIC_KEYS} if given else {}
        summary = out.write_summaries(ctx.root, run_meta(ctx, dist, lpips),
                                      {i: str(ctx.files[i]) for i in ctx.selected}, **no_gt)
        if not given:
            from util.montage import write_run_montage

            write_run_montage(ctx.root)  # figures/montage.png: the first images, from the files written above
        print(f"outputs: {ctx.root}")
        print((given.summary_line if given else summary_line)(summary))
        if summary["failed"]:
            print(f"{summary['failed']} image(s) failed: see {ctx.root / 'metrics.csv'}")
            code = code or EXIT_FAILED_IMAGES
    return code


def summary_line(summary: dict) -> str:
    """The run's result in one line: mean ± std of PSNR and SSIM, and the PSNR before the last purification."""
    m = summary["metrics"]
    fmt = lambda s: "n/a" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"
    return (f"mean PSNR {fmt(m['psnr'])} dB, SSIM {fmt(m['ssim'])} over {summary['ok']} image(s)"
            f" (before the last purification: PSNR {fmt(m['psnr_before'])})"
            + (f"; {summary['missing']} of {summary['images']} not done yet" if summary["missing"] else ""))


def run_meta(ctx: RunContext, dist: "Distributed", lpips) -> dict:
    from util.metrics import provenance as metric_provenance

    args = ctx.args
    return {
        "run_dir": str(ctx.root),
        "configs": {"task": str(args.task_config), "purification": str(args.purification_config or "(DCDP-LDM flags)"),
                    "model": str(args.model_config)},
        "overrides": list(args.overrides), "command": sys.argv[1:],
        "resolved": ctx.identity, "random_weights": ctx.random_weights,
        "checkpoint_sha256": ctx.identity["checkpoint_sha256"], "versions": versions(), "device": str(ctx.device),
        "precision": args.precision, "world_size": dist.world, "lpips": lpips.status if lpips else "n/a",
        **({"ground_truth": False, "measurements": str(ctx.measurements.root),
            "metrics_provenance": {"residual": "||A(x) - y|| / ||y|| (Frobenius norms over each measurement)"}}
           if ctx.measurements else {"metrics_provenance": metric_provenance(lpips)}),
    }


def image_problem(ctx: RunContext, image: torch.Tensor) -> Optional[str]:
    """Why an image cannot be restored as it is (its size), or None."""
    h, w = image.shape[-2:]
    multiple = getattr(ctx.prior, "size_multiple", None)
    if multiple and (h % multiple or w % multiple):
        return (f"image is {w}x{h}, not a multiple of {multiple} (the network's downsampling factor); set "
                f"others.img_size in the purification config (e.g. others.img_size={max(multiple, min(h, w) // multiple * multiple)})")
    if min(h, w) < 7:
        return f"image is {w}x{h}, smaller than SSIM's 7x7 window; use images of at least 7x7 pixels"
    return None


def restore_batch(ctx: RunContext, batch: list[int], lpips) -> list[dict]:
    """Restore the images `batch` (dataset indices) together; write their outputs and records."""
    from guided_diffusion.solver import run_dcdp
    from util import run_outputs as out
    from util.image_io import ImageError, load_image
    from util.metrics import psnr, ssim

    args, operator, prior, root, device = ctx.args, ctx.operator, ctx.prior, ctx.root, ctx.device
    records, images, kept = [], [], []

    def fail(i: int, reason: str) -> None:
        records.append(out.record_failure(root, i, ctx.files[i], reason))

    for i in batch:
        try:
            image = load_image(ctx.files[i], ctx.dataset_name, ctx.purification.image_size)
        except ImageError as exc:
            fail(i, f"unreadable image: {exc}")
            continue
        problem = image_problem(ctx, image)
        if problem:
            fail(i, problem)
            continue
        images.append(image)
        kept.append(i)
    if not kept:
        return records
    if len({tuple(im.shape) for im in images}) > 1:  # images of different sizes cannot share a batch: one by one
        return records + [r for i in kept for r in restore_batch(ctx, [i], lpips)]
    start = time.perf_counter()
    gt = torch.cat(images).to(device)                                           # (B, 3, H, W) in [-1, 1]
    generators = [torch.Generator().manual_seed(args.seed + i) for i in kept]
    try:
        states = [operator.draw_state(g, tuple(gt.shape[1:])) for g in generators]
        state = {k: torch.cat([s[k] for s in states]).to(device) for k in states[0]} if states[0] else {}
        with torch.no_grad():
            y_clean = operator.forward(gt, **state)
    except ValueError as exc:  # the operator cannot take an image of this size
        if len(kept) > 1:
            return records + [r for i in kept for r in restore_batch(ctx, [i], lpips)]
        fail(kept[0], f"the task's operator cannot take this image: {exc}")
        return records
    y = torch.cat([ctx.noiser(y_clean[b:b + 1], g) for b, g in enumerate(generators)])
    x_init = prior.init(tuple(gt.shape), generators)
    curves = {i: {"psnr": [], "ssim": []} for i in kept}

    def on_round(k, T_k, x_before, x_after):
        if args.no_curves:
            return
        to_image = prior.to_image or (lambda v: v)
        for which in (x_before, x_after):
            img = to_image(which).detach()
            for b, i in enumerate(kept):
                curves[i]["psnr"].append(psnr(gt[b], img[b])[0])
                curves[i]["ssim"].append(ssim(gt[b], img[b])[0])

    result = run_dcdp(y, operator, prior, ctx.settings, generators, x_init, operator_state=state,
                      to_image=prior.to_image, record_iterates=args.save_iterates, callback=on_round)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / len(kept)
    after_p, after_s = psnr(gt, result.x), ssim(gt, result.x)
    before_p, before_s = psnr(gt, result.x_before), ssim(gt, result.x_before)
    after_l, before_l = lpips(gt, result.x), lpips(gt, result.x_before)
    for b, i in enumerate(kept):
        failed = result.failed_at[b]
        img_state = {k: v[b:b + 1] for k, v in state.items()}
        iterates = [t[b:b + 1] for t in result.iterates] if result.iterates is not None else None
        out.save_image_outputs(root, i, gt[b], y[b], None if failed is not None else result.x[b], img_state, iterates,
                               log_scale=ctx.task.operator_name == "phase_retrieval",
                               dc=None if failed is not None else result.x_before[b])
        if not args.no_curves and failed is None:
            from util.plotting import save_metric_curves

            save_metric_curves(curves[i]["psnr"], curves[i]["ssim"], None, root / "figures" / f"{out.stem(i)}_metrics.png",
                               title=Path(ctx.files[i]).name)
        rec = out.image_record(i, ctx.files[i], seconds, result.nfe, result.dc_steps, failed)
        if failed is None:
            rec.update(psnr=after_p[b], ssim=after_s[b], psnr_before=before_p[b], ssim_before=before_s[b],
                       lpips=None if after_l is None else after_l[b],
                       lpips_net=None if after_l is None else lpips.net,
                       lpips_before=None if before_l is None else before_l[b])
        out.write_record(root, rec)
        records.append(rec)
    return records
