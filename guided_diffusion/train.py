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
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from util.checkpoints import CheckpointError, load_torch_file
from guided_diffusion.gaussian_diffusion import NUM_DIFFUSION_STEPS, q_sample
from guided_diffusion.training_data import RandomCrops
from guided_diffusion.unet import MODEL_CONFIG_DEFAULTS, create_model
from util.cli import OneLineParser, pick_device, run_command
from util.errors import ConfigError, DCDPError, RunFolderError
from util.files import REPO_ROOT, load_yaml, resolve_path
from util.image_io import atomic_save_torch
from util.run_lock import RunLock

log = logging.getLogger("dcdp.train")

CHECKPOINT_NAME = "checkpoint.pt"
EMA_NAME = "ema.pt"  # <out_dir>/ema.pt: the EMA weights, always written beside the checkpoint
PRECISIONS = ("fp32", "bf16")
# May change between a run and its resumption: how long it runs, where it writes, and the learning-rate
# decay that ends it (a run resumed to be annealed).
RUN_LENGTH_KEYS = ("max_steps", "checkpoint_minutes", "out_dir", "model_config", "decay_start_step", "decay_steps",
                   "min_lr")


@dataclass(frozen=True)
class TrainConfig:
    """The training YAML. Paths are relative to the working directory (run from the repository root)."""

    model_config: str                       # model YAML (create_model keys); its model_path is not written (see --export)
    data: str = "skimage"                   # "skimage" (the scikit-image photographs) or an image folder
    crop_size: int = 64                     # training crops are crop_size × crop_size pixels
    scale_range: tuple[float, float] = (0.5, 1.0)  # random zoom factor per crop (log-uniform)
    grey_weight: float = 1.0                # draw probability of a greyscale image relative to a colour one
    batch_size: int = 16
    lr: float = 2e-4
    warmup_steps: int = 200                 # learning rate rises linearly over these steps
    decay_start_step: int = 0               # with decay_steps > 0: cosine decay from lr to min_lr from this step
    decay_steps: int = 0                    # length of the cosine decay (0: constant learning rate)
    min_lr: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0                  # max global gradient norm
    ema_decay: float = 0.999
    max_steps: int = 1_000_000
    seed: int = 0
    precision: str = "fp32"                 # "bf16": autocast the network (weights and optimiser stay fp32)
    threads: int = 2                        # torch intra-op threads on the CPU
    checkpoint_minutes: float = 5.0
    out_dir: str = "runs/demo_train"

    def __post_init__(self) -> None:
        problem = config_problem(self)
        if problem:
            raise ConfigError(f"training config: {problem}")


class TrainingDiverged(DCDPError, FloatingPointError):
    """The loss became NaN or infinite (a learning rate too high for the data, bf16 overflow)."""


# value checks: key -> (test, what it must be)
_CHECKS: dict[str, tuple[Callable[[typing.Any], bool], str]] = {
    "crop_size": (lambda v: v >= 8, ">= 8"),
    "grey_weight": (lambda v: v >= 0, ">= 0"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: 0 < v < math.inf, "> 0"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "decay_start_step": (lambda v: v >= 0, ">= 0"),
    "decay_steps": (lambda v: v >= 0, ">= 0"),
    "min_lr": (lambda v: 0 <= v < math.inf, ">= 0"),
    "weight_decay": (lambda v: 0 <= v < math.inf, ">= 0"),
    "grad_clip": (lambda v: v > 0, "> 0"),
    "ema_decay": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "max_steps": (lambda v: v >= 1, ">= 1"),
    "threads": (lambda v: v >= 1, ">= 1"),
    "checkpoint_minutes": (lambda v: v > 0, "> 0"),
}


def config_problem(cfg: TrainConfig) -> str:
    """'' if the values of `cfg` are usable, else one phrase naming the key, the value and what it must be."""
    if cfg.precision not in PRECISIONS:
        return f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}"
    for name, (ok, must) in _CHECKS.items():
        value = getattr(cfg, name)
        try:
            good = bool(ok(value))
        except TypeError:
            good = False
        if not good:
            return f"{name} must be {must}, got {value!r}"
    lo, hi = cfg.scale_range
    if not 0 < lo <= hi:
        return f"scale_range must be [min, max] with 0 < min <= max, got {list(cfg.scale_range)}"
    if not cfg.out_dir:
        return "out_dir must name a folder, got ''"
    return ""


def _type_problem(name: str, value: object, kind: object) -> tuple[str, object]:
    """(problem or '', the value converted to the field's type)."""
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return "", value
        if isinstance(value, float) and value.is_integer():
            return "", int(value)
        return f"{name} must be a whole number, got {value!r}", value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return f"{name} must be a number, got {value!r}", value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return "", float(value)
        return f"{name} must be a number, got {value!r}", value
    if kind is str:
        return ("", value) if isinstance(value, str) else (f"{name} must be a string, got {value!r}", value)
    # scale_range: tuple[float, float]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return f"{name} must be a list of two numbers [min, max], got {value!r}", value
    converted = []
    for v in value:
        problem, v = _type_problem(name, v, float)
        if problem:
            return f"{name} must be a list of two numbers [min, max], got {value!r}", value
        converted.append(v)
    return "", tuple(converted)


def load_train_config(path: str | os.PathLike, **overrides) -> TrainConfig:
    """Read a training YAML into a `TrainConfig`, checked: unknown keys, wrong types and bad values raise
    `ConfigError` naming the file, the key, the value and what it must be. `overrides` (command-line values,
    e.g. max_steps, out_dir) replace the file's."""
    path = os.fspath(path)
    raw = load_yaml(path, "training config", "give a training YAML such as training_configurations/demo.yaml",
                    empty_ok=True)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"training config '{path}': unknown key(s) {unknown}; valid keys are {list(fields)}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if not raw.get("model_config"):
        raise ConfigError(f"training config '{path}': model_config is missing; set it to a model YAML such as "
                          f"model_configurations/model_config_demo.yaml")
    hints = typing.get_type_hints(TrainConfig)
    for name, value in list(raw.items()):
        kind = hints[name]
        problem, raw[name] = _type_problem(name, value, kind if kind in (int, float, str) else tuple)
        if problem:
            raise ConfigError(f"training config '{path}': {problem}")
    try:
        return TrainConfig(**raw)
    except ConfigError as exc:
        raise ConfigError(f"training config '{path}': {str(exc).removeprefix('training config: ')}") from None


def load_model_config(path: str | os.PathLike) -> dict:
    """Read a model YAML (create_model keys only), checked: a relative path may also be relative to the
    repository; the network it describes is built (on the meta device) so that a bad value fails here, as
    a `ConfigError` naming the file. Its model_path is not used by training (see --export)."""
    path = str(resolve_path(path))
    cfg = load_yaml(path, "model config", "set model_config in the training config to a model YAML such as "
                                          "model_configurations/model_config_demo.yaml", empty_ok=True)
    unknown = sorted(set(cfg) - set(MODEL_CONFIG_DEFAULTS))
    if unknown:
        raise ConfigError(f"model config '{path}': unknown key(s) {unknown}; valid keys are {sorted(MODEL_CONFIG_DEFAULTS)}")
    if cfg.get("learn_sigma", MODEL_CONFIG_DEFAULTS["learn_sigma"]):
        raise ConfigError(f"model config '{path}': training learns ε only; set learn_sigma: false")
    try:
        with torch.device("meta"):
            create_model(**{**cfg, "model_path": None})
    except (ValueError, TypeError, KeyError) as exc:  # the constructor's checks of the architecture values
        reason = " ".join(str(exc).split()).removeprefix("model config: ")
        fix = "" if ";" in reason else "; fix that value"
        raise ConfigError(f"model config '{path}': {reason}{fix}") from None
    return cfg


def check_crop_size(cfg: TrainConfig, model_cfg: Mapping, where: str) -> None:
    """The crops must pass the UNet's downsamplings: crop_size a multiple of 2^(levels − 1)."""
    with torch.device("meta"):
        factor = create_model(**{**model_cfg, "model_path": None}).downsample_factor
    if cfg.crop_size % factor:
        raise ConfigError(f"training config '{where}': crop_size {cfg.crop_size} is not a multiple of {factor} (the "
                          f"model's total downsampling); use e.g. {max(factor, cfg.crop_size // factor * factor)}")


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


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def tracked_by_git(path: str | os.PathLike) -> bool:
    """Whether `path` is a file tracked by the git repository it lies in (False without git or a repository)."""
    path = os.path.abspath(path)
    try:
        done = subprocess.run(["git", "-C", os.path.dirname(path), "ls-files", "--error-unmatch", "--",
                               os.path.basename(path)], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_out_dir(cfg: TrainConfig, resume: str | None, force: bool) -> None:
    """A fresh run must not overwrite another run's checkpoint in out_dir (one run per run folder)."""
    existing = os.path.join(cfg.out_dir, CHECKPOINT_NAME)
    if not os.path.exists(existing) or (resume is not None and _same_file(existing, resume)):
        return
    if force:
        log.warning("--force: overwriting the training checkpoint '%s' of an earlier run", existing)
        return
    how = (f"continue it with --resume {existing}" if resume is None
           else f"resume from '{existing}' instead of '{resume}'")
    raise RunFolderError(
        f"out_dir '{cfg.out_dir}' already holds another training run ('{existing}'); {how}, set another out_dir "
        f"(--out_dir DIR), or pass --force to overwrite it")


def check_export(export: str, model_cfg: Mapping, model_cfg_path: str, out_dir: str, resumed: Mapping | None,
                 force: bool) -> str:
    """The --export path, checked: not a folder, not the checkpoint, in a writable folder, and not an existing
    file (the shipped prior, a file tracked by git, the model config's model_path, anything else) unless
    it is the resumed run's own export or `force`."""
    if not export or os.path.isdir(export):
        raise ConfigError(f"--export {export!r} is {'a folder' if export else 'empty'}; give the file that receives "
                          f"the EMA weights, e.g. {os.path.join(out_dir, 'prior.pt')}")
    if _same_file(export, os.path.join(out_dir, CHECKPOINT_NAME)):
        raise ConfigError(f"--export '{export}' is the training checkpoint; export to another file, e.g. "
                          f"{os.path.join(out_dir, 'prior.pt')}")
    if os.path.exists(export):
        own = resumed is not None and resumed.get("export") and _same_file(export, resumed["export"])
        if not own:
            model_path = model_cfg.get("model_path")
            candidates = [] if not model_path else [model_path, os.path.join(REPO_ROOT, model_path)]
            if tracked_by_git(export):
                what = "a file tracked by git" + (" (the shipped demo prior)"
                                                  if _same_file(export, os.path.join(REPO_ROOT, "models", "demo_prior.pt"))
                                                  else "")
            elif any(_same_file(export, c) for c in candidates if os.path.exists(c)):
                what = f"the model_path of the model config '{model_cfg_path}' (the prior dcdp.py loads)"
            else:
                what = "an existing file"
            if not force:
                raise ConfigError(
                    f"--export '{export}' is {what}; training does not overwrite it unless told to: export to a new file "
                    f"(e.g. {os.path.join(out_dir, 'prior.pt')}), or pass --force to replace it")
            log.warning("--force: --export overwrites %s, '%s'", what, export)
    folder = os.path.dirname(os.path.abspath(export))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
            pass
    except OSError as exc:
        raise ConfigError(f"--export '{export}': cannot write in the folder '{folder}' ({type(exc).__name__}: "
                          f"{exc.strerror or exc}); choose a writable path") from None
    return export


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
