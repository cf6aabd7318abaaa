"""A run's context: the three files (with the DCDP-LDM flags and the overrides), everything built from
them and checked, and its run folder, claimed before any image is restored. `build_context` makes one
immutable `RunContext`; `open_run_folder` creates and locks the folder and records its identity."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from guided_diffusion.config import (
    Override, PurificationConfig, TaskConfig, ldm_driver_purification, load_model_config,
    load_purification_config, load_task_config, parse_overrides,
)
from util.errors import ConfigError, RunFolderError
from util.files import resolve_path

if TYPE_CHECKING:
    from .distributed import Distributed

log = logging.getLogger("dcdp")


# The official DCDP-LDM driver's flags (upstream-dcdp.md §3.1, §8): purification settings given on the
# command line. Values are read as the official argparse did (strings; full_ddim "True"/"False").
LDM_FLAGS = ("full_ddim", "total_num_iterations", "csgm_num_iterations", "ddim_init_timestep", "ddim_end_timestep",
             "purification_schedule", "ddim_eta", "ddim_num_iterations", "save_every_main", "save_every_sub",
             "optimizer", "lr", "momentum", "data_consistency_type")


# --ldm_config names an official latent-diffusion config; these are ours for the same networks.
LDM_CONFIGS = {"ffhq-ldm-vq-4.yaml": "model_configurations/model_config_ldm_ffhq.yaml",
               "cin256-v2.yaml": "model_configurations/model_config_ldm_imagenet.yaml"}


DEFAULT_LDM_CONFIG = "ffhq-ldm-vq-4.yaml"


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
    from util.image_io import DATASETS, list_images

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
        files, dataset_name, data_root = measurements.files, MODE, args.measurements
        if pur.image_size is not None:
            log.info("note: others.img_size is not used with --measurements (every measurement keeps its size)")
        dataset_identity = measurements.identity()
    else:
        root_path = resolve_path(data_root)
        try:
            files = list_images(root_path, dataset_name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        listing = "\n".join(str(Path(f).relative_to(root_path)) if Path(f).is_relative_to(root_path) else str(f)
                            for f in files)
        dataset_identity = {"name": dataset_name, "root": str(root_path.resolve()), "images": len(files),
                            "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    selected = list(range(len(files)))[: args.max_images]

    checkpoint = model_cfg.get("model_path")
    from guided_diffusion.model_check import sha256_file

    identity = {
        "task": {"operator": task.operator, "noise": task.noise},
        "purification": pur.resolved(),
        "model": model_cfg,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
        "random_weights": random_weights or bool(getattr(operator, "random_weights", False)),
        "seed": args.seed, "no_purification": args.no_purification,
        "dataset": dataset_identity,
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
        out.make_dirs(ctx.root, ctx.args.save_iterates, ground_truth=ctx.measurements is None)
        if not config_file.is_file():
            out.atomic_write_text(config_file, json.dumps(ctx.identity, indent=1))
        saved_run_state = ctx.operator.saved_state()
        if saved_run_state:
            out.atomic_save_torch({k: v.cpu() for k, v in saved_run_state.items()}, ctx.root / "operator_state.pt")
