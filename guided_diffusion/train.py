"""Train the small guided-diffusion UNet that ships as the demo prior.

    python -m guided_diffusion.train --config training_configurations/demo.yaml \
        [--export PATH [--force]] [--resume CHECKPOINT] [--max_minutes M] [--max_steps N] [--out_dir DIR] \
        [--device cpu|cuda|cuda:N]

On a CPU shared with other processes, set OMP_WAIT_POLICY=PASSIVE in the environment (it must be
set before torch starts): spinning OpenMP threads slow training several-fold under competition.

Loss: the DDPM ε-prediction loss ‖ε − ε_θ(x_t, t)‖² (mean over pixels and batch) with
x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε on the 1000-step linear β schedule, t uniform in 0..999.
Only ε is learned (`learn_sigma: false`); DCDP's DDIM and Tweedie purifiers use nothing else.

Optimiser: AdamW with a linear learning-rate warm-up, gradient-norm clipping and an EMA of the
weights whose decay warms up as min(decay, (1 + n) / (10 + n)). Every `checkpoint_minutes` (and
at the end) the full training state goes to `<out_dir>/checkpoint.pt` and the EMA weights to
`<out_dir>/ema.pt` (a plain state_dict, usable as a model config's model_path), both written
atomically, so usable weights exist at any time. Training writes nowhere else unless told to:
`--export PATH` also writes the EMA weights to PATH. An existing file there (the shipped
models/demo_prior.pt, a file tracked by git, the model config's model_path, any other file) is refused
unless it is the export of the run being resumed, or `--force` is given; the model config's
model_path is never written by itself. One run per out_dir: `<out_dir>/.lock` (util/run_lock.py) refuses
a second training process on the same folder, and a fresh run refuses an out_dir that holds another
run's checkpoint (continue it with --resume, or --force to start over).
`--resume` restores model, EMA, optimiser, step and RNG state and continues exactly.

Every user error (config file, flags, checkpoint, folders) ends the command with one line
`error: ...` and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from util.checkpoints import CheckpointError, load_torch_file
from guided_diffusion.gaussian_diffusion import NUM_DIFFUSION_STEPS, q_sample
from guided_diffusion.training_data import RandomCrops
from guided_diffusion.unet import create_model
from util.cli import OneLineParser, pick_device, run_command
from util.errors import ConfigError, DCDPError, RunFolderError
from util.files import resolve_path
from util.image_io import atomic_save_torch
from util.run_lock import RunLock

from .train_config import (  # noqa: F401  (TrainConfig, load_model_config: re-exported)
    CHECKPOINT_NAME, EMA_NAME, RUN_LENGTH_KEYS, TrainConfig, check_crop_size, check_export, check_out_dir,
    load_model_config, load_train_config,
)

log = logging.getLogger("dcdp.train")

class TrainingDiverged(DCDPError, FloatingPointError):
    """The loss became NaN or infinite (a learning rate too high for the data, bf16 overflow)."""


# ---------------------------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up, then constant; with decay_steps,
    a cosine from there to min_lr over decay_steps steps starting at decay_start_step, then min_lr."""
    lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.decay_steps > 0 and step >= cfg.decay_start_step:
        t = min(1.0, (step - cfg.decay_start_step) / cfg.decay_steps)
        lr = cfg.min_lr + (lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    return lr


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay after optimiser step `step` (0-based): min(decay, (1 + n) / (10 + n)), n = step."""
    return min(decay, (1.0 + step) / (10.0 + step))


def diffusion_loss(model: nn.Module, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """DDPM ε-loss: mean of (ε − ε_θ(x_t, t))², x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε (DDPM eq. 4, 14).

    x0, eps: (B, 3, H, W); t: (B,) int64 in 0..999. The coefficients come from the float64 ᾱ table
    and are cast to float32 per sample, as guided-diffusion's `_extract_into_tensor` does.
    """
    x_t = q_sample(x0, t, eps)
    eps_hat = model(x_t, t)[:, :3].float()
    return (eps - eps_hat).pow(2).mean()


@dataclass
class TrainState:
    """Everything a checkpoint holds."""

    model: nn.Module
    ema: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator              # CPU generator for crops, t and ε
    step: int = 0
    losses: list[float] = field(default_factory=list)


def build_state(cfg: TrainConfig, model_cfg: Mapping, device: torch.device) -> TrainState:
    """Fresh model (seeded init), EMA = model, AdamW, generator seeded with cfg.seed."""
    torch.manual_seed(cfg.seed)
    model = create_model(**{**model_cfg, "model_path": None}).to(device).train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    return TrainState(model, ema, optimizer, generator)


def train_step(state: TrainState, data: RandomCrops, cfg: TrainConfig, device: torch.device) -> float:
    """One optimiser step on a fresh batch; updates the EMA; returns the loss."""
    g = state.generator
    x0 = data.sample(cfg.batch_size, g)                                              # (B, 3, c, c) in [-1, 1]
    t = torch.randint(0, NUM_DIFFUSION_STEPS, (cfg.batch_size,), generator=g)        # (B,)
    eps = torch.randn(x0.shape, generator=g)                                         # (B, 3, c, c)
    x0, t, eps = x0.to(device), t.to(device), eps.to(device)

    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(state.step, cfg)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        loss = diffusion_loss(state.model, x0, t, eps)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    state.optimizer.step()

    decay = ema_decay_at(state.step, cfg.ema_decay)
    with torch.no_grad():
        for name, value in state.model.state_dict().items():
            if value.dtype.is_floating_point:
                state.ema[name].lerp_(value, 1.0 - decay)
            else:
                state.ema[name].copy_(value)
    state.step += 1
    state.losses.append(float(loss.detach()))
    return state.losses[-1]


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def save_checkpoint(state: TrainState, cfg: TrainConfig, model_cfg: Mapping, path: str | os.PathLike,
                    export: str | os.PathLike | None = None) -> None:
    """The whole training state (model, EMA, optimiser, step, RNG states, configs, loss history, and the
    --export path, so that resuming may rewrite the run's own export without --force)."""
    atomic_save_torch(
        {
            "step": state.step,
            "model": state.model.state_dict(),
            "ema": state.ema,
            "optimizer": state.optimizer.state_dict(),
            "generator": state.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "train_config": config_dict(cfg),
            "model_config": dict(model_cfg),
            "losses": torch.tensor(state.losses, dtype=torch.float64),
            "export": "" if export is None else os.path.realpath(export),
        },
        path,
    )


def export_ema(state: TrainState, path: str | os.PathLike) -> None:
    """The EMA weights as a plain name → float32 tensor dict, loadable by create_model(model_path=...)."""
    atomic_save_torch({k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.ema.items()}, path)


def config_dict(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["scale_range"] = list(d["scale_range"])
    return d


CHECKPOINT_KEYS = ("step", "model", "ema", "optimizer", "generator", "torch_rng", "train_config", "model_config",
                   "losses")


def read_training_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint (what `save_checkpoint` writes), checked; one-line errors otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        where = "is a folder" if os.path.isdir(path) else "not found"
        raise ConfigError(f"--resume '{path}': {where}; give the {CHECKPOINT_NAME} of an earlier training run "
                          f"(e.g. runs/demo_train/{CHECKPOINT_NAME}), or leave --resume out to start afresh")
    ckpt = load_torch_file(path, what="--resume", fix=f"it is not a complete training checkpoint (interrupted copy?); "
                                                       f"resume from another copy, or start afresh without --resume")
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, Mapping) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"--resume '{path}': not a training checkpoint (it lacks {', '.join(repr(k) for k in missing[:4])}); give "
            f"the {CHECKPOINT_NAME} of a training run's out_dir (an exported prior such as models/demo_prior.pt holds "
            f"the weights only and cannot be resumed)")
    return dict(ckpt)


def settings_diff(ckpt: Mapping, cfg: TrainConfig, model_cfg: Mapping) -> list[str]:
    """The settings of `cfg` and `model_cfg` that differ from the checkpoint's (run length may change)."""
    saved = {k: v for k, v in ckpt["train_config"].items() if k not in RUN_LENGTH_KEYS}
    now = {k: v for k, v in config_dict(cfg).items() if k not in RUN_LENGTH_KEYS}
    diff = [f"{k} (checkpoint {saved.get(k)!r}, now {now.get(k)!r})"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    saved_model = {k: v for k, v in ckpt["model_config"].items() if k != "model_path"}  # where it points may change
    now_model = {k: v for k, v in dict(model_cfg).items() if k != "model_path"}
    changed = sorted(k for k in set(saved_model) | set(now_model) if saved_model.get(k) != now_model.get(k))
    if changed:
        diff.append(f"model_config contents ({', '.join(changed)})")
    return diff


def load_checkpoint(state: TrainState, path: str | os.PathLike | Mapping, cfg: TrainConfig, model_cfg: Mapping) -> None:
    """Restore `state` from a checkpoint (its path, or what `read_training_checkpoint` returned); the
    configs must match the checkpoint's except for run length."""
    ckpt = path if isinstance(path, Mapping) else read_training_checkpoint(path)
    diff = settings_diff(ckpt, cfg, model_cfg)
    if diff:
        where = "" if isinstance(path, Mapping) else f" '{os.fspath(path)}'"
        raise ConfigError(
            f"--resume{where}: the checkpoint was trained with different settings: {'; '.join(diff)}; resume with "
            f"the settings it was trained with (only {', '.join(RUN_LENGTH_KEYS)} may change) or start a new run")
    state.model.load_state_dict(ckpt["model"], strict=True)
    device = next(state.model.parameters()).device
    state.ema = {k: v.to(device) for k, v in ckpt["ema"].items()}
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.generator.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    state.step = int(ckpt["step"])
    state.losses = ckpt["losses"].tolist()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train(
    cfg: TrainConfig,
    model_cfg: Mapping,
    device: str | torch.device = "cpu",
    resume: str | os.PathLike | Mapping | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    export: str | os.PathLike | None = None,
    data: RandomCrops | None = None,
) -> TrainState:
    """Train until cfg.max_steps, the time budget or `should_stop()`; checkpoint and export at the end.

    Writes `<out_dir>/checkpoint.pt` and `<out_dir>/ema.pt` and, with `export`, the EMA weights to that
    file too; nothing else (the model config's `model_path` is not used). `resume` is a checkpoint (path or
    `read_training_checkpoint`'s dict) written by an earlier run with the same settings (run length may
    differ); `max_minutes` is a wall-clock budget. Returns the final state; `state.losses` holds the loss
    of every step since step 0. `data`: the training crops if already built from cfg (else built here). No
    checks of existing files here: the command line (`main`) does those.
    """
    device = torch.device(device)
    if data is None:
        data = RandomCrops(cfg.data, cfg.crop_size, cfg.scale_range, cfg.grey_weight)
    state = build_state(cfg, model_cfg, device)
    ckpt_path = os.path.join(cfg.out_dir, CHECKPOINT_NAME)
    if resume is not None:
        load_checkpoint(state, resume, cfg, model_cfg)
        log.info("resumed %sat step %d", "" if isinstance(resume, Mapping) else f"from {os.fspath(resume)} ",
                 state.step)
        if state.step >= cfg.max_steps:
            log.info("the checkpoint is at step %d >= max_steps %d: no training steps, saving only (raise max_steps "
                     "or pass --max_steps to train on)", state.step, cfg.max_steps)
    n_params = sum(p.numel() for p in state.model.parameters())
    log.info("model %.2fM parameters; %d training images; %s crops of %d px, batch %d, %s on %s",
             n_params / 1e6, len(data), cfg.data, cfg.crop_size, cfg.batch_size, cfg.precision, device)

    start = last_save = time.monotonic()
    deadline = math.inf if max_minutes is None else start + 60.0 * max_minutes
    first_step = state.step
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, desc="train")
    with logging_redirect_tqdm():  # log lines go above the bar instead of through it
        while state.step < cfg.max_steps and time.monotonic() < deadline and not should_stop():
            loss = train_step(state, data, cfg, device)
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"training diverged at step {state.step}: loss {loss}; lower lr (now {cfg.lr:g}) or grad_clip in "
                    f"the training config, or use precision: fp32, and resume from the last checkpoint "
                    f"'{ckpt_path}' or start afresh")
            recent = state.losses[-100:]
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)  # mean of the last 100
            if time.monotonic() - last_save >= 60.0 * cfg.checkpoint_minutes:
                _save(state, cfg, model_cfg, ckpt_path, start, first_step, export)
                last_save = time.monotonic()
    bar.close()
    _save(state, cfg, model_cfg, ckpt_path, start, first_step, export)
    return state


def _save(state: TrainState, cfg: TrainConfig, model_cfg: Mapping, ckpt_path: str, start: float, first_step: int,
          export: str | os.PathLike | None) -> None:
    ema_path = os.path.join(cfg.out_dir, EMA_NAME)
    written = [ckpt_path, ema_path] + ([] if export is None else [os.fspath(export)])
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        save_checkpoint(state, cfg, model_cfg, ckpt_path, export)
        export_ema(state, ema_path)
        if export is not None:
            export_ema(state, export)
    except OSError as exc:
        raise RunFolderError(
            f"cannot write the training outputs {written} ({type(exc).__name__}: {exc.strerror or exc}); free some "
            f"space or choose a writable out_dir / --export, then --resume '{ckpt_path}' if it was written before"
        ) from None
    elapsed = time.monotonic() - start
    recent = state.losses[-200:]
    log.info("step %d  loss(last %d) %.4f  %.2f s/step  %.1f min  saved %s",
             state.step, len(recent), sum(recent) / max(len(recent), 1),
             elapsed / max(state.step - first_step, 1), elapsed / 60, " and ".join(written))


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m guided_diffusion.train", description=__doc__.split("\n")[0],
                      command="python -m guided_diffusion.train")
    p.add_argument("--config", required=True, help="training YAML, e.g. training_configurations/demo.yaml")
    p.add_argument("--export", default=None, metavar="PATH",
                   help="also write the EMA weights here (besides <out_dir>/ema.pt); an existing file is refused "
                        "without --force unless it is the resumed run's own export")
    p.add_argument("--force", action="store_true",
                   help="allow --export to overwrite an existing file (e.g. models/demo_prior.pt) and a fresh run to "
                        "overwrite another run's checkpoint in out_dir")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from, e.g. runs/demo_train/checkpoint.pt")
    p.add_argument("--max_minutes", type=float, default=None, help="stop cleanly (and save) after this many minutes")
    p.add_argument("--max_steps", type=int, default=None, help="train up to this step (overrides the config's max_steps)")
    p.add_argument("--out_dir", default=None, help="the run folder (overrides the config's out_dir)")
    return run_command(p, argv, _run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    if args.max_minutes is not None and not args.max_minutes >= 0:
        raise ConfigError(f"--max_minutes {args.max_minutes:g}: must be >= 0 (minutes of training)")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max_steps {args.max_steps}: must be >= 1")
    if args.out_dir == "":
        raise ConfigError("--out_dir '': give a folder")
    cfg = load_train_config(args.config, max_steps=args.max_steps, out_dir=args.out_dir)
    model_cfg_path = str(resolve_path(cfg.model_config))
    model_cfg = load_model_config(cfg.model_config)
    check_crop_size(cfg, model_cfg, args.config)
    device = pick_device(args.device)
    resumed = None
    if args.resume is not None:
        resumed = read_training_checkpoint(args.resume)
        diff = settings_diff(resumed, cfg, model_cfg)
        if diff:
            raise ConfigError(
                f"--resume '{args.resume}': the checkpoint was trained with different settings than '{args.config}': "
                f"{'; '.join(diff)}; resume with the settings it was trained with (only {', '.join(RUN_LENGTH_KEYS)} "
                f"may change) or start a new run")
    torch.set_num_threads(cfg.threads)
    data = RandomCrops(cfg.data, cfg.crop_size, cfg.scale_range, cfg.grey_weight)  # bad data fails before any output

    with RunLock(cfg.out_dir, flag="--out_dir"):  # one training run per out_dir
        check_out_dir(cfg, args.resume, args.force)
        export = None if args.export is None else check_export(args.export, model_cfg, model_cfg_path, cfg.out_dir,
                                                                 resumed, args.force)
        if export is None:
            log.info("the EMA weights go to %s (no --export)", os.path.join(cfg.out_dir, EMA_NAME))
        if device.type == "cpu" and cfg.threads > 1 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
            log.info("hint: on a CPU shared with other processes, start with OMP_WAIT_POLICY=PASSIVE; spinning "
                     "OpenMP threads made training steps up to 7x slower here when another process was running")
        stop = {"requested": False}

        def request_stop(signum, frame):  # SIGTERM / SIGINT: finish the step, save, exit
            log.info("signal %d: stopping after this step", signum)
            stop["requested"] = True

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("config %s: %s", args.config, config_dict(cfg))
            log.info("model config %s: %s", model_cfg_path, model_cfg)
            train(cfg, model_cfg, device, resume=resumed, max_minutes=args.max_minutes,
                  should_stop=lambda: stop["requested"], export=export, data=data)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
