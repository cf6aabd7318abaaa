"""The training command's configuration: the training YAML and the model YAML it names, checked, and
the places training may write (its out_dir; an --export path), checked before anything is written.
Every problem is a `ConfigError` (one line: the file, the key, the value and what it must be)."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import subprocess
import tempfile
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from guided_diffusion.unet import MODEL_CONFIG_DEFAULTS, create_model
from util.errors import ConfigError, RunFolderError
from util.files import REPO_ROOT, load_yaml, resolve_path

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
# Where training may write
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
