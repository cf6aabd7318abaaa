"""Options YAML → KernelWizard with its weights (strict), or random weights for `pretrained: null`."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from bkse.kernel_wizard import KernelWizard, check_options
from util.checkpoints import CheckpointError, load_strict, read_state_dict
from util.files import load_yaml, resolve_path

DEFAULT_OPTIONS = "bkse/options/generate_blur/default.yml"
CHECKPOINT_SOURCE = (
    "the Google Drive link in the README of https://github.com/VinAIResearch/blur-kernel-space-exploring"
)
RANDOM_INIT_SEED = 0  # `pretrained: null` networks are random but reproducible


def load_options(opt_yml_path: str | os.PathLike = DEFAULT_OPTIONS) -> dict:
    """Read the `KernelWizard` section of a bkse options YAML (keys as in bkse's default.yml)."""
    path = resolve_path(opt_yml_path)
    doc = load_yaml(opt_yml_path, "nonlinear_blur: options",
                    fix=f"set opt_yml_path in the task config (e.g. ./{DEFAULT_OPTIONS})")
    if not isinstance(doc, Mapping) or "KernelWizard" not in doc:
        raise ValueError(f"{path}: no 'KernelWizard' section; start from {DEFAULT_OPTIONS}")
    opt = dict(doc["KernelWizard"])
    check_options(opt, where=str(path))
    return opt


def checkpoint_path(opt: Mapping, opt_yml_path: str | os.PathLike = DEFAULT_OPTIONS) -> Path | None:
    """The existing checkpoint named by `pretrained` (None for `pretrained: null`); CheckpointError if missing."""
    if opt.get("pretrained") is None:
        return None
    path = resolve_path(opt["pretrained"]).resolve()
    if not path.is_file():
        raise CheckpointError(
            f"nonlinear_blur: KernelWizard checkpoint '{path}' not found (the 'pretrained' entry of {opt_yml_path}); "
            f"download {path.name} from {CHECKPOINT_SOURCE} and place it at {path}, or point 'pretrained' at it"
        )
    return path


def load_kernel_wizard(opt_yml_path: str | os.PathLike = DEFAULT_OPTIONS, device: str | torch.device = "cpu",
                       adapt_only: bool = True) -> KernelWizard:
    """Build the KernelWizard of an options YAML on `device`, in eval mode with frozen parameters.

    The checkpoint must hold exactly the full network's keys and shapes, kernel extractor included,
    even when `adapt_only` drops that encoder (all `adaptKernel` needs); a missing file fails before
    anything is built. `pretrained: null` gives seeded random weights and `random_weights = True`.
    """
    opt = load_options(opt_yml_path)
    path = checkpoint_path(opt, opt_yml_path)
    if path is None:
        with torch.random.fork_rng(devices=[]):  # reproducible, and the caller's RNG is left alone
            torch.manual_seed(RANDOM_INIT_SEED)
            model = KernelWizard(opt, with_kernel_extractor=not adapt_only)
        return model.to(device).eval().requires_grad_(False)

    what = f"nonlinear_blur KernelWizard ({path.name})"
    state_dict = read_state_dict(path, what=what, source=CHECKPOINT_SOURCE)
    with torch.device("meta"):  # the full key set, without allocating the 115 M parameters
        full = KernelWizard(opt)
    check_keys(full, state_dict, what=what, path=path)
    if adapt_only:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("kernel_extractor.")}
    with torch.device("meta"):
        model = KernelWizard(opt, with_kernel_extractor=not adapt_only)
    model = model.to_empty(device=device)  # no random init: every parameter is loaded next
    load_strict(model, state_dict, what=what, path=str(path), source=CHECKPOINT_SOURCE)
    model.random_weights = False
    return model.eval().requires_grad_(False)


def check_keys(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str, path: Path) -> None:
    """CheckpointError unless `state_dict` has exactly `model`'s keys and shapes (`model` may be on meta)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    wrong = [f"{k} {theirs[k]} != {s}" for k, s in own.items() if k in theirs and theirs[k] != s]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})"] if unexpected else []
        parts += [f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})"] if wrong else []
        raise CheckpointError(
            f"{what}: checkpoint '{path}' does not match the options: {'; '.join(parts)}. "
            f"Use the options the file was trained with, or re-download it from {CHECKPOINT_SOURCE}"
        )
