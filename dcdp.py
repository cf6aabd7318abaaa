"""DCDP: Decoupled Data Consistency with Diffusion Purification for image restoration.

    python dcdp.py --task_config task_configurations/super_resolution_config.yaml \
                   --purification_config purification_configurations/purification_config_super_resolution.yaml \
                   --model_config model_configurations/model_config_ffhq.yaml

With no arguments it runs the offline demo (super-resolution ×4 with the embedded demo prior on data/demo).
The driver only parses arguments, builds objects from the YAML files and loops over images; the
algorithm is in guided_diffusion/solver.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from guided_diffusion.checkpoints import CheckpointError
from guided_diffusion.config import (
    REPO_ROOT, ConfigError, load_model_config, load_purification_config, load_task_config, resolve_path,
)

log = logging.getLogger("dcdp")

DEMO = {
    "task_config": "task_configurations/demo/super_resolution.yaml",
    "purification_config": "purification_configurations/demo/super_resolution.yaml",
    "model_config": "model_configurations/model_config_demo.yaml",
    "save_dir": "./results/demo",
}

EXIT_FAILED_IMAGES = 3
EXIT_BAD_INPUT = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_config", help="task YAML (measurement operator and noise)")
    p.add_argument("--purification_config", help="purification YAML (DCDP hyper-parameters, dataset)")
    p.add_argument("--model_config", help="model YAML (network and checkpoint)")
    p.add_argument("--save_dir", default=None, help="output root (default ./purification_results; demo: ./results/demo)")
    p.add_argument("--gpu", type=int, default=0, help="CUDA device index (official flag)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: the GPU when there is one)")
    p.add_argument("--seed", type=int, default=0, help="base seed; image i uses seed + i")
    p.add_argument("--max_images", type=int, default=None, help="process at most this many images (default: all)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="images restored together (results do not depend on it); default 1, 8 with --fast")
    p.add_argument("--data_root", default=None, help="override the dataset root of the purification config")
    p.add_argument("--dataset", default=None, help="override the dataset name (ffhq, ImageNet, folder)")
    p.add_argument("--resume", action="store_true", help="skip images whose outputs are complete")
    p.add_argument("--save_iterates", action="store_true", help="keep every iterate (official x_list_complete.pt)")
    p.add_argument("--no_purification", action="store_true", help="data consistency alone (a baseline)")
    p.add_argument("--no_curves", action="store_true", help="skip per-round metrics and the curve figures")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="network precision; auto = fp16 autocast on CUDA (official), fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--cuda_graphs", action="store_true",
                   help="CUDA graphs: torch.compile mode reduce-overhead for the network, and with "
                        "--exact_transpose the data-consistency steps replayed from one captured graph")
    p.add_argument("--channels_last", action="store_true",
                   help="channels-last memory format for the networks (the prior, and the nonlinear-blur network)")
    p.add_argument("--exact_transpose", action="store_true",
                   help="closed-form data-consistency gradient instead of autograd: (2/N)·Aᵀ(Ax−y) for linear "
                        "operators, and phase retrieval's own")
    p.add_argument("--fast", action="store_true",
                   help="fast path: --batch_size 8 (unless given) --exact_transpose --channels_last --no_curves, "
                        "and on CUDA bf16 + --cuda_graphs")
    p.add_argument("--check_models", action="store_true", help="list the checkpoints the shipped configs name and exit")
    p.add_argument("--quiet", action="store_true", help="warnings and errors only, no progress bar")
    args = p.parse_args(argv)
    given = [args.task_config, args.purification_config, args.model_config]
    if not any(given):
        for k, v in DEMO.items():
            if k != "save_dir" or args.save_dir is None:
                setattr(args, k, v)
    elif not all(given):
        p.error("--task_config, --purification_config and --model_config go together (or give none for the demo)")
    if args.save_dir is None:
        args.save_dir = "./purification_results"
    return args


def pick_device(args) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", args.gpu))
    if args.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(args.device)


def apply_fast(args, device: torch.device) -> None:
    if not args.fast:
        return
    args.exact_transpose = args.channels_last = args.no_curves = True
    if args.batch_size is None:
        args.batch_size = 8
    if device.type == "cuda":
        args.compile = args.cuda_graphs = True
        if args.precision == "auto":
            args.precision = "bf16"


def versions() -> dict:
    import numpy
    import skimage

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "scikit-image": skimage.__version__}


class Distributed:
    """torchrun support: rank r restores images i with i % world == r; rank 0 merges the summaries."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        if self.active:
            import torch.distributed as dist

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def shard(self, indices: list[int]) -> list[int]:
        return [i for i in indices if i % self.world == self.rank]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.check_models:
        from guided_diffusion.model_check import check_models, format_check_table

        rows = check_models(REPO_ROOT)
        print(format_check_table(rows))
        return 1 if any(r["layout"] in ("mismatch", "unreadable", "config error") for r in rows) else 0
    try:
        return run(args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as exc:
        log.error(f"error: {exc}")
        return EXIT_BAD_INPUT
    except Exception as exc:
        if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise
        cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc  # the compiler's own error
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        log.error(f"error: the network compiled by torch.compile failed ({type(cause).__name__}: {first}); run "
                  f"without --compile, --cuda_graphs and --fast to see whether compilation is the cause (a broken "
                  f"toolchain: Triton on CUDA, a C++ compiler on the CPU)")
        return EXIT_BAD_INPUT


def run(args) -> int:
    from tqdm import tqdm

    from guided_diffusion.measurements import get_noise, get_operator
    from guided_diffusion.priors import build_prior, resolve_precision
    from guided_diffusion.solver import run_dcdp
    from util import run_outputs as out
    from util.image_io import ImageError, list_images, load_image
    from util.metrics import LPIPS, psnr, ssim

    device = pick_device(args)
    apply_fast(args, device)
    task = load_task_config(args.task_config)
    pur = load_purification_config(args.purification_config)
    model_cfg = load_model_config(args.model_config)
    for key in task.ignored:
        log.info(f"note: task config block '{key}' is not used by DCDP (as in the official code)")
    settings = pur.settings(purify=False if args.no_purification else None)
    if args.exact_transpose:
        settings.exact_transpose = True
    settings.cuda_graphs = args.cuda_graphs and device.type == "cuda"
    if args.cuda_graphs and device.type != "cuda":
        log.warning("note: --cuda_graphs has no effect without a CUDA device")
    dataset_name = args.dataset or pur.dataset_name
    data_root = args.data_root or pur.dataset_root

    # Build everything that can fail before doing any work.
    op_params = {k: v for k, v in task.operator.items() if k != "name"}
    operator = get_operator(task.operator_name, device=device, **op_params)
    if args.channels_last and hasattr(operator, "channels_last"):
        operator.channels_last()  # a network inside the operator (nonlinear blur)
    noise_params = {k: v for k, v in task.noise.items() if k != "name"}
    noiser = get_noise(task.noise["name"], **noise_params)
    if model_cfg.get("model_path") is None:
        log.warning(f"warning: '{args.model_config}' has no model_path: the network has RANDOM weights")
    else:
        model_cfg["model_path"] = str(resolve_path(model_cfg["model_path"]))
    if getattr(operator, "random_weights", False):
        log.warning(f"warning: operator '{task.operator_name}' uses RANDOM network weights")
    prior, prior_info = build_prior(
        model_cfg, full_ddim=pur.full_ddim, ddim_num_iterations=pur.ddim_num_iterations, device=device,
        precision=args.precision, compile_model="reduce-overhead" if settings.cuda_graphs else args.compile,
        channels_last=args.channels_last,
        purification=pur.prior_options(),
    )
    files = list_images(resolve_path(data_root), dataset_name)
    if args.max_images is not None:
        files = files[: args.max_images]
    dist = Distributed(device)

    root = out.run_dir_name(args.save_dir, task.operator_name, dataset_name, task.sigma, settings, pur.full_ddim,
                            pur.ddim_num_iterations, suffix=prior_info.get("run_suffix", ""))
    identity = {
        "task": {"operator": task.operator, "noise": task.noise},
        "purification": {k: v for k, v in pur.raw.items() if k not in ("save_every_main", "save_every_sub")},
        "model": model_cfg, "seed": args.seed, "no_purification": args.no_purification,
        "dataset": {"name": dataset_name, "root": str(data_root)},
        # the network precision changes the numbers of pixel priors (the others ignore --precision)
        "precision": resolve_precision(device, args.precision) if prior_info["kind"] == "pixel" else None,
    }
    identity = json.loads(json.dumps(identity, default=str))
    config_file = root / "run_config.json"
    if args.resume and config_file.is_file():  # every rank checks, so none waits for a rank that refused
        previous = json.loads(config_file.read_text())
        previous.setdefault("precision", identity["precision"])  # records made before it was recorded
        if previous != identity:
            changed = sorted(k for k in identity if previous.get(k) != identity.get(k))
            raise ConfigError(
                f"--resume: '{config_file}' was made with different settings ({', '.join(changed)}); "
                f"use the same configs or another --save_dir")
    dist.barrier()  # all ranks have read the old record before rank 0 replaces it
    out.make_dirs(root, args.save_iterates)
    if dist.rank == 0:
        out.atomic_write_text(config_file, json.dumps(identity, indent=1))

    saved_run_state = operator.saved_state()
    if saved_run_state and dist.rank == 0:
        out.atomic_save_torch({k: v.cpu() for k, v in saved_run_state.items()}, root / "operator_state.pt")
    indices = dist.shard(list(range(len(files))))
    todo = [i for i in indices if not (args.resume and out.image_complete(root, i))]
    if len(todo) < len(indices):
        log.info(f"resume: {len(indices) - len(todo)} image(s) already complete, {len(todo)} to do")
    log.info(f"{len(files)} image(s) from '{data_root}' → {root}  (device {device}, prior {prior_info['kind']})")

    lpips = LPIPS(device)
    image_size = pur.image_size
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=args.quiet, file=sys.stderr)
    batch_size = max(1, args.batch_size or 1)
    psnr_running: list[float] = []
    pos = 0
    while pos < len(todo):
        batch = todo[pos: pos + batch_size]
        try:
            done = restore_batch(batch, files, args, device, dataset_name, image_size, operator, noiser, prior,
                                 settings, root, lpips, psnr, ssim, load_image, ImageError, out, run_dcdp)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            log.warning(f"out of GPU memory: retrying with --batch_size {batch_size}")
            continue
        for rec in done:
            if rec.get("psnr") is not None:
                psnr_running.append(rec["psnr"])
        pos += len(batch)
        bar.update(len(batch))
        if psnr_running:
            bar.set_postfix(psnr=f"{sum(psnr_running) / len(psnr_running):.2f}")
    bar.close()

    dist.barrier()
    code = 0
    if dist.rank == 0:
        meta = {
            "run_dir": str(root), "configs": {"task": str(args.task_config), "purification": str(args.purification_config),
                                              "model": str(args.model_config)},
            "resolved": identity, "versions": versions(), "device": str(device), "precision": args.precision,
            "world_size": dist.world, "lpips": lpips.status,
        }
        ckpt = model_cfg.get("model_path")
        if ckpt and Path(ckpt).is_file():
            from guided_diffusion.model_check import sha256_file

            meta["checkpoint_sha256"] = sha256_file(Path(ckpt))
        summary = out.write_summaries(root, meta)
        m = summary["metrics"]
        fmt = lambda s: "n/a" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"
        print(f"outputs: {root}")
        print(f"mean PSNR {fmt(m['psnr'])} dB, SSIM {fmt(m['ssim'])} over {summary['ok']} image(s)"
              f" (before the last purification: PSNR {fmt(m['psnr_before'])})")
        if summary["failed"]:
            print(f"{summary['failed']} image(s) failed: see {root / 'metrics.csv'}")
            code = EXIT_FAILED_IMAGES
    dist.close()
    return code


def restore_batch(batch, files, args, device, dataset_name, image_size, operator, noiser, prior, settings, root,
                  lpips, psnr, ssim, load_image, ImageError, out, run_dcdp) -> list[dict]:
    """Restore the images `batch` (dataset indices) together; write their outputs and records."""
    records, images, kept = [], [], []
    for i in batch:
        try:
            images.append(load_image(files[i], dataset_name, image_size))
            kept.append(i)
        except ImageError as exc:
            log.warning(f"skipping: {exc}")
            rec = {"index": i, "file": str(files[i]), "status": "failed", "reason": f"unreadable image: {exc}"}
            out.write_record(root, rec)
            records.append(rec)
    if not kept:
        return records
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:  # images of different sizes cannot share a batch: do them one by one
        return records + [r for i in kept for r in restore_batch([i], files, args, device, dataset_name, image_size,
                                                                  operator, noiser, prior, settings, root, lpips,
                                                                  psnr, ssim, load_image, ImageError, out, run_dcdp)]
    start = time.perf_counter()
    gt = torch.cat(images).to(device)                                           # (B, 3, H, W) in [-1, 1]
    generators = [torch.Generator().manual_seed(args.seed + i) for i in kept]
    states = [operator.draw_state(g, tuple(gt.shape[1:])) for g in generators]
    state = {k: torch.cat([s[k] for s in states]).to(device) for k in states[0]} if states[0] else {}
    with torch.no_grad():
        y_clean = operator.forward(gt, **state)
    y = torch.cat([noiser(y_clean[b:b + 1], g) for b, g in enumerate(generators)])
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

    result = run_dcdp(y, operator, prior, settings, generators, x_init, operator_state=state,
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
        out.save_image_outputs(root, i, gt[b], y[b], None if failed is not None else result.x[b], img_state, iterates)
        if not args.no_curves and failed is None:
            from util.plotting import save_metric_curves

            save_metric_curves(curves[i]["psnr"], curves[i]["ssim"], None, root / "figures" / f"{out.stem(i)}_metrics.png")
        rec = {"index": i, "file": str(files[i]), "status": "ok", "reason": "", "seconds": round(seconds, 3),
               "nfe": result.nfe, "dc_steps": result.dc_steps}
        if failed is not None:
            rec.update(status="failed", reason=f"non-finite iterate (NaN/Inf) at outer iteration {failed}")
            log.warning(f"image {i} ({files[i]}): diverged at outer iteration {failed}; continuing")
        else:
            rec.update(psnr=after_p[b], ssim=after_s[b], psnr_before=before_p[b], ssim_before=before_s[b],
                       lpips=None if after_l is None else after_l[b],
                       lpips_before=None if before_l is None else before_l[b])
        out.write_record(root, rec)
        records.append(rec)
    return records


if __name__ == "__main__":
    sys.exit(main())
