"""DCDP: Decoupled Data Consistency with Diffusion Purification for image restoration.

    python dcdp.py --task_config task_configurations/super_resolution_config.yaml \
                   --purification_config purification_configurations/purification_config_super_resolution.yaml \
                   --model_config model_configurations/model_config_ffhq.yaml

With no arguments it runs the offline demo (super-resolution ×4 with the embedded demo prior on data/demo).
The driver only parses arguments, builds objects from the YAML files and loops over images; the
algorithm is in guided_diffusion/solver.py, the run around it (context, run folder, image loop) in runner/.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from runner.context import DEFAULT_LDM_CONFIG, LDM_CONFIGS, LDM_FLAGS, build_context, check_run_folder, open_run_folder
from runner.context import load_configs  # noqa: F401  (callers inspect the loaded files through dcdp)
from runner.distributed import Distributed
from runner.restore import restore_all
from util.cli import EXIT_BAD_INPUT, EXIT_FAILED_IMAGES, EXIT_INTERRUPTED, OneLineParser  # noqa: F401
from util.cli import pick_device as parse_device
from util.errors import DCDPError
from util.files import REPO_ROOT

log = logging.getLogger("dcdp")

DEMO = {
    "task_config": "task_configurations/demo/super_resolution.yaml",
    "purification_config": "purification_configurations/demo/super_resolution.yaml",
    "model_config": "model_configurations/model_config_demo.yaml",
    "save_dir": "./results/demo",
}





def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                      command="python dcdp.py",
                                epilog="key=value arguments after the options override any key of the three files: "
                                       "purification.lr=1e4 measurement.noise.sigma=0.05 model.model_path=/ckpt.pt")
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
    p.add_argument("--dataset", default=None, help="override the dataset name (ffhq, celeb, ImageNet, folder)")
    p.add_argument("--measurements", default=None, metavar="DIR",
                   help="restore the measurements y in DIR (no ground truth; see runner/measurement_input.py)")
    p.add_argument("--resume", action="store_true", help="skip images whose outputs are complete")
    p.add_argument("--random_weights", action="store_true",
                   help="run the network with random weights (no checkpoint; for testing); the run is marked so")
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
    p.add_argument("--lpips", default="vgg", choices=("vgg", "alex", "off"),
                   help="LPIPS backbone (official: vgg); off skips LPIPS. Not part of the run identity: it changes "
                        "no restoration, only the LPIPS columns (weights: python scripts/fetch_lpips_weights.py)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="KEY=V1,V2",
                   help="run a grid: one ordinary run per combination of the values (or a YAML file with a "
                        "'sweep:' block); table and plots in {save_dir}/sweeps/ (runner/sweep.py)")
    ldm = p.add_argument_group("official DCDP-LDM flags", "purification settings as the official DCDP-LDM driver "
                               "takes them; without --purification_config they start from its defaults")
    for flag in LDM_FLAGS:
        ldm.add_argument(f"--{flag}", default=None, metavar="VALUE")
    ldm.add_argument("--ldm_config", default=None, metavar="FILE",
                     help="official latent-diffusion config name: ffhq-ldm-vq-4.yaml (FFHQ LDM) or cin256-v2.yaml (ImageNet)")
    ldm.add_argument("--diffusion_config", default=None, metavar="CKPT", help="the LDM checkpoint (model.model_path)")
    ldm.add_argument("--z_dim", default=None, metavar="SHAPE", help="latent shape; only (1,3,64,64), as the official LDMs")
    ldm.add_argument("--verbose", default=None, metavar="BOOL", help="accepted for compatibility (progress is always shown)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a key of the task, purification or model file")
    args = p.parse_intermixed_args(argv)
    for bad in [o for o in args.overrides if "=" not in o]:
        p.error(f"unexpected argument '{bad}'; overrides are key=value, e.g. purification.lr=1e4")
    if args.max_images is not None and args.max_images < 1:
        p.error(f"--max_images must be >= 1, got {args.max_images}")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.measurements and (args.data_root or args.dataset):
        p.error("--measurements restores the measurement files of its folder; leave out --data_root and --dataset")
    args.ldm_flags = {f: getattr(args, f) for f in LDM_FLAGS if getattr(args, f) is not None}
    ldm_mode = bool(args.ldm_flags or args.ldm_config or args.diffusion_config or args.z_dim)
    args.ldm_driver = False
    if not any([args.task_config, args.purification_config, args.model_config]) and not ldm_mode:
        for k, v in DEMO.items():
            if k != "save_dir" or args.save_dir is None:
                setattr(args, k, v)
    elif not args.task_config:
        p.error("--task_config is needed (with --purification_config and --model_config; or give none for the demo)")
    elif args.model_config and args.ldm_config:
        p.error("give --model_config or --ldm_config, not both")
    elif not args.model_config and not args.ldm_config and args.purification_config:
        p.error("--model_config is needed with --purification_config (or --ldm_config for a latent-diffusion prior)")
    if args.task_config and not args.model_config:  # the official DCDP-LDM driver: its default LDM
        args.ldm_driver = True
        name = Path(args.ldm_config or DEFAULT_LDM_CONFIG).name
        if name not in LDM_CONFIGS:
            p.error(f"--ldm_config '{args.ldm_config}': unknown latent-diffusion config; valid: {', '.join(LDM_CONFIGS)}")
        args.model_config = LDM_CONFIGS[name]
        if args.save_dir is None and name == "cin256-v2.yaml":
            args.save_dir = "./purification_results_imagenet"  # as the official dcdp_imagenet.py
    if args.save_dir is None:
        args.save_dir = "./purification_results"
    return args




def pick_device(args) -> torch.device:
    """--device; `auto` and `cuda` mean this torchrun rank's GPU (LOCAL_RANK, else --gpu)."""
    return parse_device(args.device, cuda_index=int(os.environ.get("LOCAL_RANK", args.gpu)))


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






def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # --help, or a one-line usage error (exit 2)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.check_models:
        from guided_diffusion.model_check import check_models, format_check_table

        rows = check_models(REPO_ROOT)
        print(format_check_table(rows))
        return 1 if any(r["layout"] in ("mismatch", "unreadable", "config error") for r in rows) else 0
    try:
        if args.sweep:
            from runner.sweep import run_sweep

            return run_sweep(args, run)
        return run(args)
    except DCDPError as exc:
        log.error(f"error: {exc}")
        return EXIT_BAD_INPUT












def run(args) -> int:
    device = pick_device(args)
    apply_fast(args, device)
    dist = Distributed(device)
    lock = None
    try:
        ctx = build_context(args, device, dist)
        args.run_root = ctx.root  # for a sweep: where this point's run is
        lock = dist.agree(lambda: open_run_folder(ctx, dist))
        if lock is None:  # torchrun ranks >= 1 join rank 0's lock
            from util.run_lock import RunLock

            lock = RunLock(ctx.root, shared_id=dist.run_id, create=False).acquire()
        dist.agree(lambda: check_run_folder(ctx, dist))
        code = restore_all(ctx, dist)
        if code != EXIT_INTERRUPTED:
            dist.barrier()
        return code
    finally:
        if lock is not None:
            lock.release()
        dist.close()










if __name__ == "__main__":
    sys.exit(main())
