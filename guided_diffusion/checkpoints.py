"""The one place where checkpoints are read: strict, loud, never silently random."""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from util.errors import DCDPError


class CheckpointError(DCDPError, RuntimeError):
    """A checkpoint is missing, unreadable or does not match the model."""


def read_state_dict(path: str | os.PathLike, *, what: str, source: str) -> dict[str, torch.Tensor]:
    """Read a state_dict from `path` on the CPU.

    Accepts a plain ``name -> tensor`` mapping and the usual wrappers (``{"state_dict": ...}`` as
    Lightning writes it, ``{"model": ...}``), and strips a ``module.`` prefix. `what` names the model
    and `source` says where the file can be downloaded; both go into the error message.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{what}: checkpoint '{path}' not found; download it from {source} and place it at that path "
            f"(or set model_path in the model config)"
        )
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or pickled-object files
        raise CheckpointError(
            f"{what}: cannot read checkpoint '{path}' ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            f"re-download it from {source}"
        ) from exc
    for wrapper in ("state_dict", "model", "ema"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{what}: '{path}' does not hold a state_dict of tensors; re-download it from {source}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def describe_mismatch(state: Mapping[str, tuple], expected: Mapping[str, tuple]) -> str:
    """'' when the keys and shapes of `state` equal `expected`, else a one-line summary of the differences."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {state[k]} != {v}" for k, v in expected.items() if k in state and tuple(state[k]) != tuple(v)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
    return "; ".join(parts)


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str, path: str, source: str) -> nn.Module:
    """`load_state_dict(strict=True)` with a one-line error naming the first mismatches."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mismatch = describe_mismatch({k: tuple(v.shape) for k, v in state_dict.items()}, own)
    if mismatch:
        raise CheckpointError(
            f"{what}: checkpoint '{path}' does not match the model config: {mismatch}. "
            f"Check that the model config matches the file, or re-download it from {source}"
        )
    model.load_state_dict(state_dict, strict=True)
    return model


def load_weights(model: nn.Module, path: str | os.PathLike, *, what: str, source: str) -> nn.Module:
    """Load `path` into `model` strictly and freeze it for inference (eval, no parameter grads)."""
    sd = read_state_dict(path, what=what, source=source)
    load_strict(model, sd, what=what, path=os.fspath(path), source=source)
    return model.eval().requires_grad_(False)
