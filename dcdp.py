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
import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from guided_diffusion.config import (
    Override, PurificationConfig, TaskConfig, ldm_driver_purification, load_model_config,
    load_purification_config, load_task_config, parse_overrides,
)
from util.cli import EXIT_BAD_INPUT, OneLineParser
from util.cli import pick_device as parse_device
from util.errors import ConfigError, DCDPError, RunFolderError
from util.files import REPO_ROOT, resolve_path

log = logging.getLogger("dcdp")

DEMO = {
    "task_config": "task_configurations/demo/super_resolution.yaml",
    "purification_config": "purification_configurations/demo/super_resolution.yaml",
    "model_config": "model_configurations/model_config_demo.yaml",
    "save_dir": "./results/demo",
}

EXIT_FAILED_IMAGES = 3
EXIT_INTERRUPTED = 130


# The official DCDP-LDM driver's flags (upstream-dcdp.md §3.1, §8): purification settings given on the
# command line. Values are read as the official argparse did (strings; full_ddim "True"/"False").
LDM_FLAGS = ("full_ddim", "total_num_iterations", "csgm_num_iterations", "ddim_init_timestep", "ddim_end_timestep",
             "purification_schedule", "ddim_eta", "ddim_num_iterations", "save_every_main", "save_every_sub",
             "optimizer", "lr", "momentum", "data_consistency_type")
# --ldm_config names an official latent-diffusion config; these are ours for the same networks.
LDM_CONFIGS = {"ffhq-ldm-vq-4.yaml": "model_configurations/model_config_ldm_ffhq.yaml",
               "cin256-v2.yaml": "model_configurations/model_config_ldm_imagenet.yaml"}
DEFAULT_LDM_CONFIG = "ffhq-ldm-vq-4.yaml"


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


def ldm_flag_values(args) -> dict:
    """The DCDP-LDM flags as config values: --full_ddim and the others are strings in the official driver."""
    values = dict(args.ldm_flags)
    if "full_ddim" in values:
        text = values["full_ddim"]
        if text not in ("True", "False", "true", "false"):
            raise ConfigError(f"--full_ddim {text!r}: use True or False (as the official DCDP-LDM driver)")
        values["full_ddim"] = text in ("True", "true")
    if args.z_dim is not None:
        digits = [int(t) for t in "".join(c if c.isdigit() else " " for c in args.z_dim).split()]
        if digits != [1, 3, 64, 64]:
            raise ConfigError(f"--z_dim {args.z_dim!r}: the official latent-diffusion priors have latents (1,3,64,64); "
                              f"leave --z_dim out")
    return values


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
        # the ranks of one torchrun share their run's folder lock
        self.run_id = (os.environ.get("TORCHELASTIC_RUN_ID")
                       or f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}") if self.active else None
        if self.active:
            import torch.distributed as dist

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def shard(self, indices: list[int]) -> list[int]:
        return [i for i in indices if i % self.world == self.rank]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, step):
        """Run `step()` on every rank; if it raises a user error on any rank, every rank raises it."""
        error, value = None, None
        try:
            value = step()
        except DCDPError as exc:
            error = exc
        if self.active:
            import torch.distributed as dist

            errors = [None] * self.world
            dist.all_gather_object(errors, None if error is None else str(error))
            first = next((e for e in errors if e is not None), None)
            if first is not None and error is None:
                if value is not None and hasattr(value, "release"):
                    value.release()
                raise RunFolderError(first)
        if error is not None:
            raise error
        return value

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.destroy_process_group()


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


@dataclass(frozen=True)
class RunContext:
    """Everything a run needs, built and checked once before any image is restored or any file written."""

    args: argparse.Namespace
    device: torch.device
    task: TaskConfig
    purification: PurificationConfig
    model_config: dict
    settings: object          # DCDPSettings
    operator: object
    noiser: object
    prior: object
    prior_info: dict
    dataset_name: str
    data_root: str
    files: list               # every image of the dataset, sorted; image i is files[i]
    selected: list            # the indices this run restores (all ranks), after --max_images
    identity: dict
    root: Path
    random_weights: bool
    measurements: object = None  # a runner.measurement_input.MeasurementFolder: y given, no ground truth


def load_configs(args):
    """The three files, with the DCDP-LDM flags and the key=value overrides applied, all checked."""
    overrides = parse_overrides(args.overrides)
    task = load_task_config(args.task_config, overrides)
    flags = ldm_flag_values(args)
    if args.purification_config:  # the LDM flags override the file, after the key=value overrides
        flag_overrides = [Override(f"--{k}", "purification", ("purification", k), v) for k, v in flags.items()]
        pur = load_purification_config(args.purification_config, overrides + flag_overrides, dataset_fallback=task.data)
    else:
        pur = ldm_driver_purification(flags, overrides, dataset_fallback=task.data)
        log.info("note: no --purification_config: the official DCDP-LDM driver's defaults and flags are used")
    model_overrides = list(overrides)
    if args.diffusion_config:
        model_overrides.append(Override("--diffusion_config", "model", ("model_path",), args.diffusion_config))
    model_cfg = load_model_config(args.model_config, model_overrides, random_weights=args.random_weights)
    return task, pur, model_cfg


def build_context(args, device: torch.device, dist: "Distributed") -> RunContext:
    from guided_diffusion.measurements import get_noise, get_operator
    from guided_diffusion.priors import build_prior
    from util import run_outputs as out
    from util.image_io import list_images

    task, pur, model_cfg = load_configs(args)
    for key in task.ignored:
        log.info(f"note: task config block '{key}' is not used by DCDP (as in the official code)")
    for note in task.notes:
        log.info(note)
    settings = pur.settings(purify=False if args.no_purification else None)
    if args.exact_transpose:
        settings.exact_transpose = True
    settings.cuda_graphs = args.cuda_graphs and device.type == "cuda"
    if args.cuda_graphs and device.type != "cuda":
        log.warning("note: --cuda_graphs has no effect without a CUDA device")
    dataset_name = args.dataset or pur.dataset_name
    data_root = args.data_root or pur.dataset_root
    from util.image_io import DATASETS

    if dataset_name not in DATASETS:
        raise ConfigError(f"--dataset {dataset_name!r} is not allowed; use one of {', '.join(DATASETS)}")

    op_params = {k: v for k, v in task.operator.items() if k != "name"}
    try:
        operator = get_operator(task.operator_name, device=device, **op_params)
        noiser = get_noise(task.noise["name"], **{k: v for k, v in task.noise.items() if k != "name"})
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"task config '{args.task_config}': {exc}") from None
    if args.channels_last and hasattr(operator, "channels_last"):
        operator.channels_last()  # a network inside the operator (nonlinear blur)
    random_weights = model_cfg.get("model_path") is None
    if random_weights:
        log.warning(f"warning: '{args.model_config}' runs with RANDOM weights (model_path: null or --random_weights); "
                    f"the run folder and summary say so")
    else:
        model_cfg["model_path"] = str(resolve_path(model_cfg["model_path"]).resolve())
    if getattr(operator, "random_weights", False):
        log.warning(f"warning: operator '{task.operator_name}' uses RANDOM network weights")
    try:
        prior, prior_info = build_prior(
            model_cfg, full_ddim=pur.full_ddim, ddim_num_iterations=pur.ddim_num_iterations, device=device,
            precision=args.precision, compile_model="reduce-overhead" if settings.cuda_graphs else args.compile,
            channels_last=args.channels_last, purification=pur.prior_options())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model config '{args.model_config}': {exc}") from None
    multiple = getattr(prior, "size_multiple", None)
    if pur.image_size is not None and multiple and pur.image_size % multiple:
        raise ConfigError(f"purification config '{args.purification_config}': others.img_size {pur.image_size} is not "
                          f"a multiple of {multiple}, the network's downsampling factor; use e.g. "
                          f"{max(multiple, pur.image_size // multiple * multiple)}")
    measurements = None
    if args.measurements:  # the files are measurements y, not clean images
        from runner.measurement_input import MODE, scan

        measurements = scan(resolve_path(args.measurements))
        files, dataset_name, data_root, root_path = measurements.files, MODE, args.measurements, measurements.root
        if pur.image_size is not None:
            log.info("note: others.img_size is not used with --measurements (every measurement keeps its size)")
    else:
        root_path = resolve_path(data_root)
        try:
            files = list_images(root_path, dataset_name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    selected = list(range(len(files)))[: args.max_images]

    checkpoint = model_cfg.get("model_path")
    from guided_diffusion.model_check import sha256_file

    listing = "\n".join(str(Path(f).relative_to(root_path)) if Path(f).is_relative_to(root_path) else str(f)
                        for f in files)
    identity = {
        "task": {"operator": task.operator, "noise": task.noise},
        "purification": pur.resolved(),
        "model": model_cfg,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
        "random_weights": random_weights or bool(getattr(operator, "random_weights", False)),
        "seed": args.seed, "no_purification": args.no_purification,
        "dataset": measurements.identity() if measurements else {
            "name": dataset_name, "root": str(root_path.resolve()), "images": len(files),
            "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()},
        # the network precision changes the numbers of pixel priors (the others ignore --precision)
        "precision": prior_info["precision"],  # the network precision, where it changes the numbers (pixel priors)
        "flags": {"exact_transpose": settings.exact_transpose, "channels_last": args.channels_last,
                  "compile": bool(args.compile or settings.cuda_graphs), "cuda_graphs": settings.cuda_graphs},
    }
    identity = json.loads(json.dumps(identity, default=str))
    identity["purification"]["dataset"]["root"] = identity["dataset"]["root"]
    suffix = "_".join(x for x in (prior_info.get("run_suffix", ""), "random_weights" if identity["random_weights"] else "")
                      if x)
    root = out.run_dir_name(args.save_dir, task.operator_name, dataset_name, task.sigma, settings, pur.full_ddim,
                            pur.ddim_num_iterations, suffix=suffix, identity=identity)
    return RunContext(args=args, device=device, task=task, purification=pur, model_config=model_cfg,
                      settings=settings, operator=operator, noiser=noiser, prior=prior, prior_info=prior_info,
                      dataset_name=dataset_name, data_root=str(data_root), files=files, selected=selected,
                      identity=identity, root=root, random_weights=identity["random_weights"],
                      measurements=measurements)


def open_run_folder(ctx: RunContext, dist: "Distributed"):
    """Create the run folder, take its lock and record its identity; refuse a folder of another run.

    Returns the held lock. torchrun: rank 0 takes the lock, the other ranks join it.
    """
    from util.run_lock import RunLock

    save_dir = Path(ctx.args.save_dir)
    for parent in (save_dir, *save_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise RunFolderError(f"--save_dir '{save_dir}': '{parent}' is a file, not a folder; give another --save_dir")
    if dist.rank == 0:
        try:
            ctx.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"--save_dir '{save_dir}': cannot create '{ctx.root}' ({exc.strerror}); give a "
                                 f"writable --save_dir") from None
        if not os.access(ctx.root, os.W_OK):
            raise RunFolderError(f"--save_dir '{save_dir}': '{ctx.root}' is not writable; give a writable --save_dir")
        return RunLock(ctx.root, shared_id=dist.run_id).acquire()
    return None


def check_run_folder(ctx: RunContext, dist: "Distributed") -> None:
    """Refuse a folder whose `run_config.json` records other settings; else record ours (rank 0)."""
    from util import run_outputs as out

    config_file = ctx.root / "run_config.json"
    if config_file.is_file():
        try:
            previous = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != ctx.identity:
            changed = sorted(k for k in ctx.identity
                             if not isinstance(previous, dict) or previous.get(k) != ctx.identity.get(k))
            raise RunFolderError(
                f"run folder '{ctx.root}' holds a run with other settings ({', '.join(changed)}) in "
                f"'{config_file}'; move that folder away or use another --save_dir")
    if dist.rank == 0:
        out.make_dirs(ctx.root, ctx.args.save_iterates)
        if not config_file.is_file():
            out.atomic_write_text(config_file, json.dumps(ctx.identity, indent=1))
        saved_run_state = ctx.operator.saved_state()
        if saved_run_state:
            out.atomic_save_torch({k: v.cpu() for k, v in saved_run_state.items()}, ctx.root / "operator_state.pt")


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
    lpips = LPIPS(ctx.device, net=args.lpips) if ctx.measurements is None else None  # no ground truth: no LPIPS
    restore = restore_batch
    if ctx.measurements is not None:
        from runner import measurement_restore as given

        restore = given.restore_batch
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=args.quiet, file=sys.stderr)
    batch_size = args.batch_size or 1
    psnr_running: list[float] = []
    pos = 0
    interrupted = False
    with logging_redirect_tqdm(loggers=[log]):
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
        no_gt = {} if ctx.measurements is None else {"columns": given.CSV_COLUMNS, "metric_keys": given.METRIC_KEYS}
        summary = out.write_summaries(ctx.root, run_meta(ctx, dist, lpips),
                                      {i: str(ctx.files[i]) for i in ctx.selected}, **no_gt)
        if ctx.measurements is None:
            from util.montage import write_run_montage

            write_run_montage(ctx.root)  # figures/montage.png: the first images, from the files written above
        m = summary["metrics"]
        fmt = lambda s: "n/a" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"
        print(f"outputs: {ctx.root}")
        if no_gt:
            print(given.summary_line(summary))
        else:
            print(f"mean PSNR {fmt(m['psnr'])} dB, SSIM {fmt(m['ssim'])} over {summary['ok']} image(s)"
                  f" (before the last purification: PSNR {fmt(m['psnr_before'])})"
                  + (f"; {summary['missing']} of {summary['images']} not done yet" if summary["missing"] else ""))
        if summary["failed"]:
            print(f"{summary['failed']} image(s) failed: see {ctx.root / 'metrics.csv'}")
            code = code or EXIT_FAILED_IMAGES
    return code


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
        log.warning(f"image {i} ({ctx.files[i]}): {reason}; continuing")
        rec = {"index": i, "file": str(ctx.files[i]), "status": "failed", "reason": reason}
        out.write_record(root, rec)
        records.append(rec)

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
        rec = {"index": i, "file": str(ctx.files[i]), "status": "ok", "reason": "", "seconds": round(seconds, 3),
               "nfe": result.nfe, "dc_steps": result.dc_steps}
        if failed is not None:
            rec.update(status="failed", reason=f"non-finite iterate (NaN/Inf) at outer iteration {failed}")
            log.warning(f"image {i} ({ctx.files[i]}): diverged at outer iteration {failed}; continuing")
        else:
            rec.update(psnr=after_p[b], ssim=after_s[b], psnr_before=before_p[b], ssim_before=before_s[b],
                       lpips=None if after_l is None else after_l[b],
                       lpips_net=None if after_l is None else lpips.net,
                       lpips_before=None if before_l is None else before_l[b])
        out.write_record(root, rec)
        records.append(rec)
    return records


if __name__ == "__main__":
    sys.exit(main())
