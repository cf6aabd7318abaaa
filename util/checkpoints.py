"""The one place where checkpoints are read: strict, loud, never silently random."""
from __future__ import annotations

import os
import re
import zipfile
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
    obj = load_torch_file(path, what=what, fix=f"re-download it from {source} and check its SHA-256 with "
                                                 f"`python dcdp.py --check_models`")
    for wrapper in ("state_dict", "model", "ema"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{what}: '{path}' does not hold a state_dict of tensors; re-download it from {source}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_torch_file(path: str | os.PathLike, *, what: str, fix: str) -> object:
    """`torch.load(path, weights_only=True)` on the CPU (memory-mapped where the format allows).

    A file torch cannot read raises `CheckpointError`, one whole line: `what`, the file, its size, what is
    wrong with it (`describe_unreadable`) and `fix` (what the user should do).
    """
    path = os.fspath(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or pickled-object files
        raise CheckpointError(f"{what}: cannot read checkpoint '{path}': {describe_unreadable(path, exc)}; {fix}") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def describe_unreadable(path: str | os.PathLike, exc: BaseException) -> str:
    """What is wrong with a file that torch.load failed on, in a few words on one line (size included)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        size, head = None, b""
    size_text = "" if size is None else f"{size:,} bytes"
    sized = f" ({size_text})" if size_text else ""
    text = " ".join(_ANSI.sub("", str(exc)).split())
    if size == 0:
        return "the file is empty (0 bytes; the download or copy did not happen or failed)"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return (f"the file is truncated or damaged{sized}: a torch zip archive whose end (the central directory) "
                f"is missing, as when a download or copy stopped early")
    glob = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if glob:
        return (f"it holds pickled Python objects ({glob.group(1)}) besides tensors, which a weights-only load "
                f"refuses; save a plain state_dict of tensors instead")
    if isinstance(exc, EOFError):
        return f"the file is truncated{sized}: it ends in the middle of its data"
    if head[:1] != b"\x80" and head != b"PK\x03\x04":
        return f"the file is not a PyTorch checkpoint{sized}: it is neither a torch zip archive nor a pickle"
    reason = re.split(r"(?<=[.!?]) ", text, maxsplit=1)[0].rstrip(".")  # torch's first sentence, whole
    if "internal miniz error" in reason or not reason:
        reason = type(exc).__name__
    return f"the file is truncated or corrupt ({size_text + '; ' if size_text else ''}{type(exc).__name__}: {reason})"


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
