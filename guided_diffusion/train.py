"""Train the small guided-diffusion UNet that ships as the demo prior.

    python -m guided_diffusion.train --config training_configurations/demo.yaml \
        [--device cpu|cuda] [--resume PATH] [--max_minutes M]

On a CPU shared with other processes, set OMP_WAIT_POLICY=PASSIVE in the environment (it must be
set before torch starts): spinning OpenMP threads slow training several-fold under competition.

Loss: the DDPM ε-prediction loss ‖ε − ε_θ(x_t, t)‖² (mean over pixels and batch) with
x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε on the 1000-step linear β schedule, t uniform in 0..999.
Only ε is learned (`learn_sigma: false`); DCDP's DDIM and Tweedie purifiers use nothing else.

Optimiser: AdamW with a linear learning-rate warm-up, gradient-norm clipping and an EMA of the
weights whose decay warms up as min(decay, (1 + n) / (10 + n)). Every `checkpoint_minutes` (and
at the end) the full training state goes to `<out_dir>/checkpoint.pt` and the EMA weights to the
model config's `model_path`, both written atomically, so usable weights exist at any time.
`--resume` restores model, EMA, optimiser, step and RNG state and continues exactly.
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
import yaml
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from guided_diffusion.gaussian_diffusion import ALPHA_BAR, NUM_DIFFUSION_STEPS
from guided_diffusion.training_data import RandomCrops
from guided_diffusion.unet import MODEL_CONFIG_DEFAULTS, REPO_ROOT, create_model
from util.image_io import atomic_save_torch

log = logging.getLogger("dcdp.train")

CHECKPOINT_NAME = "checkpoint.pt"
PRECISIONS = ("fp32", "bf16")
# May change between a run and its resumption: how long it runs, where it writes, and the learning-rate
# decay that ends it (a run resumed to be annealed).
RUN_LENGTH_KEYS = ("max_steps", "checkpoint_minutes", "out_dir", "model_config", "decay_start_step", "decay_steps",
                   "min_lr")


@dataclass(frozen=True)
class TrainConfig:
    """The training YAML. Paths are relative to the working directory (run from the repository root)."""

    model_config: str                       # model YAML (create_model keys); its model_path receives the EMA export
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
        if self.precision not in PRECISIONS:
            raise ValueError(f"training config: precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("crop_size", "batch_size", "max_steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"training config: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"training config: ema_decay must be in [0, 1), got {self.ema_decay}")


def load_train_config(path: str | os.PathLike) -> TrainConfig:
    """Read a training YAML into a `TrainConfig`; unknown keys raise `ValueError` listing the valid ones."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ValueError(f"training config '{path}': unknown key(s) {unknown}; valid keys are {valid}")
    if "scale_range" in raw:
        raw["scale_range"] = tuple(float(s) for s in raw["scale_range"])
    return TrainConfig(**raw)


def load_model_config(path: str | os.PathLike) -> dict:
    """Read a model YAML (create_model keys only); a relative path may also be relative to the repository."""
    path = os.fspath(path)
    if not os.path.isabs(path) and not os.path.isfile(path):
        path = os.path.join(REPO_ROOT, path)
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    unknown = sorted(set(cfg) - set(MODEL_CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(f"model config '{path}': unknown key(s) {unknown}; valid keys are {sorted(MODEL_CONFIG_DEFAULTS)}")
    if cfg.get("learn_sigma", MODEL_CONFIG_DEFAULTS["learn_sigma"]):
        raise ValueError(f"model config '{path}': training learns ε only; set learn_sigma: false")
    if not cfg.get("model_path"):
        raise ValueError(f"model config '{path}': set model_path, the file that receives the trained weights")
    return cfg


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
    alpha_bar = torch.from_numpy(ALPHA_BAR)[t.cpu()]                       # (B,) float64
    a = alpha_bar.sqrt().float().to(x0.device).view(-1, 1, 1, 1)
    s = (1.0 - alpha_bar).sqrt().float().to(x0.device).view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
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

def save_checkpoint(state: TrainState, cfg: TrainConfig, model_cfg: Mapping, path: str | os.PathLike) -> None:
    """The whole training state (model, EMA, optimiser, step, RNG states, configs, loss history)."""
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


def load_checkpoint(state: TrainState, path: str | os.PathLike, cfg: TrainConfig, model_cfg: Mapping) -> None:
    """Restore `state` from `path`; the configs must match the checkpoint's except for run length."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved = {k: v for k, v in ckpt["train_config"].items() if k not in RUN_LENGTH_KEYS}
    now = {k: v for k, v in config_dict(cfg).items() if k not in RUN_LENGTH_KEYS}
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if {k: v for k, v in ckpt["model_config"].items() if k != "model_path"} != {
            k: v for k, v in dict(model_cfg).items() if k != "model_path"}:  # where the export goes may change
        diff.append("model_config contents")
    if diff:
        raise ValueError(f"--resume '{path}': the checkpoint was trained with different settings: {diff}")
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
    resume: str | os.PathLike | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainState:
    """Train until cfg.max_steps, the time budget or `should_stop()`; checkpoint and export at the end.

    `model_cfg` holds create_model keys; its `model_path` receives the EMA export. `resume` is a
    checkpoint written by an earlier run with the same settings (run length may differ);
    `max_minutes` is a wall-clock budget. Returns the final state; `state.losses` holds the loss of
    every step since step 0.
    """
    device = torch.device(device)
    data = RandomCrops(cfg.data, cfg.crop_size, cfg.scale_range, cfg.grey_weight)
    state = build_state(cfg, model_cfg, device)
    ckpt_path = os.path.join(cfg.out_dir, CHECKPOINT_NAME)
    if resume is not None:
        load_checkpoint(state, resume, cfg, model_cfg)
        log.info("resumed from %s at step %d", resume, state.step)
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
                raise FloatingPointError(f"training diverged at step {state.step}: loss {loss}")
            recent = state.losses[-100:]
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)  # mean of the last 100
            if time.monotonic() - last_save >= 60.0 * cfg.checkpoint_minutes:
                _save(state, cfg, model_cfg, ckpt_path, start, first_step)
                last_save = time.monotonic()
    bar.close()
    _save(state, cfg, model_cfg, ckpt_path, start, first_step)
    return state


def _save(state: TrainState, cfg: TrainConfig, model_cfg: Mapping, ckpt_path: str, start: float, first_step: int) -> None:
    save_checkpoint(state, cfg, model_cfg, ckpt_path)
    export_ema(state, model_cfg["model_path"])
    elapsed = time.monotonic() - start
    recent = state.losses[-200:]
    log.info("step %d  loss(last %d) %.4f  %.2f s/step  %.1f min  saved %s and %s",
             state.step, len(recent), sum(recent) / max(len(recent), 1),
             elapsed / max(state.step - first_step, 1), elapsed / 60, ckpt_path, model_cfg["model_path"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m guided_diffusion.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="training YAML, e.g. training_configurations/demo.yaml")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from, e.g. runs/demo_train/checkpoint.pt")
    p.add_argument("--max_minutes", type=float, default=None, help="stop cleanly (and save) after this many minutes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")

    cfg = load_train_config(args.config)
    model_cfg = load_model_config(cfg.model_config)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(cfg.threads)
    if device == "cpu" and cfg.threads > 1 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        log.info("hint: on a CPU shared with other processes, start with OMP_WAIT_POLICY=PASSIVE; spinning "
                 "OpenMP threads made training steps up to 7x slower here when another process was running")

    stop = {"requested": False}

    def request_stop(signum, frame):  # SIGTERM / SIGINT: finish the step, save, exit
        log.info("signal %d: stopping after this step", signum)
        stop["requested"] = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("config %s: %s", args.config, config_dict(cfg))
        log.info("model config %s: %s", cfg.model_config, model_cfg)
        train(cfg, model_cfg, device, resume=args.resume, max_minutes=args.max_minutes,
              should_stop=lambda: stop["requested"])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    main()
