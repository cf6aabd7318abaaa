"""Measurement folders (`dcdp.py --measurements DIR`): every file of DIR is a measurement y, not a clean image.

File discovery, the readers of measurements, masks and kernels, and their checks against the task's
operator. The driver's loop is in `runner/measurement_restore.py`.

| file in DIR (any sub-folder)                  | what                                                          |
|-----------------------------------------------|---------------------------------------------------------------|
| `NAME.png/.jpg/…` or `NAME.pt/.npy`           | a measurement y: an image, or a (3, h, w) / (1, 3, h, w) tensor in [-1, 1] (phase retrieval: Fourier magnitudes, tensors only) |
| `NAME.mask.png/.npy/.pt`, `mask.png/.npy/.pt` | inpainting mask of one image / of every image of its folder; white (>= 128) or 1 = known |
| `NAME.kernel.npy/.png/.pt`, `kernel.*`        | blur kernel of one image / of its folder: 2-D, odd sides, sum 1 (PNGs are divided by their sum); nonlinear blur: the latent kernel (.pt/.npy) |
| `NAME.state.pt`, `operator_state.pt`          | the benchmark path's `states/NAME.pt` (mask, latent kernel) and `operator_state.pt` (blur kernel) |

A benchmark run folder's `measurements/` can be given as it is: its `states/NAME.pt` and `operator_state.pt`
beside it are read as `NAME.state.pt` and `operator_state.pt`.

A per-image file wins over its folder's; without a kernel file the task YAML's kernel is used (Gaussian
parameters, motion-blur seed), without a mask file the YAML's fixed mask (box or file; a random mask
needs a mask file). Every problem with one measurement raises `MeasurementError`, that image's one-line
failure.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from util.errors import ConfigError, DCDPError
from util.image_io import DATASETS, ImageError, load_image_as_is

MODE = "measurements"
IMAGE_EXTS = DATASETS["folder"].extensions
TENSOR_EXTS = frozenset({".pt", ".npy"})
AUX_KINDS = ("mask", "kernel", "state")        # NAME.{kind}.ext: per-image; {kind}.ext: per folder
FOLDER_STATE = "operator_state.pt"
KERNEL_SUM_TOLERANCE = 1e-3                    # |Σk − 1| of a stored .npy/.pt kernel (float32 sums are ~1e-7 off)


class MeasurementError(DCDPError, ValueError):
    """One measurement (or its mask / kernel) does not fit the task's operator; the image's failure."""


@dataclass
class MeasurementFolder:
    root: Path
    files: list            # the measurements, sorted by path; image i is files[i]
    aux: list = field(default_factory=list)  # masks, kernels, states
    kernel_ops: dict = field(default_factory=dict)  # blur operators of kernel files, built once per kernel

    def identity(self) -> dict:
        """The run identity's `dataset` entry: mode, folder, and a hash of every file's name and size."""
        listing = "\n".join(f"{os.path.relpath(p, self.root)}\t{p.stat().st_size}" for p in sorted(self.files + self.aux))
        return {"name": MODE, "mode": MODE, "root": str(self.root.resolve()), "images": len(self.files),
                "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def _aux_kind(name: str) -> Optional[str]:
    stem, ext = os.path.splitext(name)
    if name == FOLDER_STATE:
        return "state"
    inner = os.path.splitext(stem)[1][1:] if "." in stem else stem
    return inner if inner in AUX_KINDS and ext.lower() in IMAGE_EXTS | TENSOR_EXTS else None


def scan(root) -> MeasurementFolder:
    """The measurement files under `root` (recursive, hidden names skipped), sorted; ConfigError if none."""
    root = Path(root)
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise ConfigError(f"--measurements '{root}' {problem}; give the folder of your measurement files")
    files, aux = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            ext = os.path.splitext(f)[1].lower()
            if f.startswith(".") or ext not in IMAGE_EXTS | TENSOR_EXTS:
                continue
            (aux if _aux_kind(f) else files).append(Path(dirpath) / f)
    if root.name == "measurements":  # a benchmark run folder's: its states/ and operator_state.pt count too
        aux += [p for p in [*(root.parent / "states").glob("*.pt"), root.parent / FOLDER_STATE] if p.is_file()]
    if not files:
        raise ConfigError(f"--measurements '{root}': no measurement files (png, jpg, …, .pt, .npy) there; put one "
                          f"file per measurement y in it")
    return MeasurementFolder(root, sorted(files, key=str), sorted(aux, key=str))


def _companion(path: Path, kind: str, exts) -> Optional[Path]:
    """NAME.{kind}.ext beside `path`, else the folder's {kind}.ext (first extension found)."""
    base = path.name[: -len(path.suffix)] if path.suffix else path.name
    for name in [f"{base}.{kind}{e}" for e in exts] + [f"{kind}{e}" for e in exts]:
        if (path.parent / name).is_file():
            return path.parent / name
    return None


def _read_array(path: Path) -> torch.Tensor:
    """A .pt tensor or .npy array as float32 (CPU); MeasurementError when unreadable or not numeric."""
    try:
        if path.suffix.lower() == ".npy":
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load and np.load raise many kinds for a bad file
        raise MeasurementError(f"cannot read '{path}' ({type(exc).__name__}); save a tensor with torch.save or "
                               f"np.save") from None
    if not isinstance(value, torch.Tensor) or value.is_complex():
        what = "complex numbers" if isinstance(value, torch.Tensor) else type(value).__name__
        raise MeasurementError(f"'{path}' holds {what}, not a real tensor; save the tensor itself (torch.save(y, "
                               f"path), y of shape (3, h, w))")
    value = value.float()
    if not torch.isfinite(value).all():
        raise MeasurementError(f"'{path}' holds NaN or Inf values; give finite numbers")
    return value


def _state_file(path: Path, key: str) -> Optional[torch.Tensor]:
    """`key` of NAME.state.pt (the benchmark path's states/NAME.pt) or of the folder's operator_state.pt."""
    base = path.name[: -len(path.suffix)]
    candidates = [path.parent / f"{base}.state.pt", path.parent / FOLDER_STATE]
    if path.parent.name == "measurements":  # a benchmark run folder's measurements/: its states/ beside it
        candidates += [path.parent.parent / "states" / f"{base}.pt", path.parent.parent / FOLDER_STATE]
    for p in candidates:
        if p.is_file():
            try:
                state = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise MeasurementError(f"cannot read '{p}' ({type(exc).__name__}); give the benchmark path's "
                                       f"states/NAME.pt or operator_state.pt as it was written") from None
            if isinstance(state, dict) and key in state:
                return state[key].float()
    return None


def read_measurement(path: Path, tensor_only: bool = False) -> torch.Tensor:
    """A measurement y as a (1, 3, h, w) float32 tensor: an image in [-1, 1], or a stored tensor."""
    if path.suffix.lower() in TENSOR_EXTS:
        y = _read_array(path)
    elif tensor_only:
        raise MeasurementError(f"'{path.name}' is a picture; this task's measurements are not images: give the "
                               f"tensor y (.pt or .npy, e.g. the benchmark path's measurements/NAME.pt)")
    else:
        try:
            with Image.open(path) as img:
                bands = [b for b in img.getbands() if b not in ("A", "a")]
        except Exception:
            bands = ["R", "G", "B"]  # unreadable: load_image_as_is says why
        if len(bands) == 1 and bands != ["P"]:
            raise MeasurementError(f"'{path.name}' is a grey image; the prior restores colour images (3 channels): "
                                   f"convert it to RGB")
        try:
            y = load_image_as_is(path)
        except ImageError as exc:
            raise MeasurementError(str(exc)) from None
    if y.dim() == 3:
        y = y.unsqueeze(0)
    if y.dim() != 4 or y.shape[0] != 1 or y.shape[1] != 3:
        raise MeasurementError(f"'{path.name}' has shape {tuple(y.shape)}; the prior restores colour images: give a "
                               f"(3, h, w) or (1, 3, h, w) tensor")
    return y.contiguous()


def read_mask(path: Path, hw: tuple) -> Optional[torch.Tensor]:
    """The inpainting mask of measurement `path` as (1, 3, H, W) in {0, 1}, or None when there is none."""
    mask_file = _companion(path, "mask", (".png", ".npy", ".pt"))
    if mask_file is not None and mask_file.suffix.lower() == ".png":
        with Image.open(mask_file) as img:
            mask = torch.from_numpy((np.asarray(img.convert("L")) >= 128).astype(np.float32))
    elif mask_file is not None:
        mask = _read_array(mask_file)
    else:
        mask, mask_file = _state_file(path, "mask"), path.name[: -len(path.suffix)] + ".state.pt"
        if mask is None:
            return None
    name = Path(mask_file).name
    if mask.dim() == 4 and mask.shape[0] == 1:
        mask = mask[0]                                                    # (C, H, W)
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3 or mask.shape[0] not in (1, 3) or tuple(mask.shape[-2:]) != tuple(hw):
        size = "x".join(map(str, mask.shape[-1:-3:-1])) if mask.dim() >= 2 else str(tuple(mask.shape))
        raise MeasurementError(f"mask '{name}' is {size}, the measurement is {hw[1]}x{hw[0]}; give a mask of the "
                               f"measurement's size")
    if mask.min() < 0 or mask.max() > 1:
        raise MeasurementError(f"mask '{name}' has values outside [0, 1]; 1 (white) = known, 0 (black) = missing")
    return mask.expand(3, *hw).unsqueeze(0).contiguous()                  # (1, 3, H, W)


def read_blur_kernel(path: Path) -> Optional[torch.Tensor]:
    """The (k, k) blur kernel of measurement `path` (odd sides, sum 1), or None (the task YAML's kernel)."""
    kernel_file = _companion(path, "kernel", (".npy", ".pt", ".png"))
    if kernel_file is None:
        kernel = _state_file(path, "kernel")
        if kernel is None:
            return None
        kernel_file = path.parent / FOLDER_STATE
    elif kernel_file.suffix.lower() == ".png":
        with Image.open(kernel_file) as img:
            kernel = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float64))
        if kernel.sum() <= 0:
            raise MeasurementError(f"kernel '{kernel_file.name}' is black; give a kernel with some white")
        kernel = (kernel / kernel.sum()).float()  # an 8-bit picture cannot hold a normalised kernel
    else:
        kernel = _read_array(kernel_file)
    while kernel.dim() > 2 and kernel.shape[0] == 1:
        kernel = kernel[0]
    name = Path(kernel_file).name
    if kernel.dim() != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise MeasurementError(f"kernel '{name}' has shape {tuple(kernel.shape)}; a blur kernel is 2-D with odd sides "
                               f"(the blur keeps the image size)")
    if kernel.min() < 0:
        raise MeasurementError(f"kernel '{name}' has negative entries; a blur kernel is non-negative")
    total = float(kernel.double().sum())
    if abs(total - 1.0) > KERNEL_SUM_TOLERANCE:
        raise MeasurementError(f"kernel '{name}' is not normalised (it sums to {total:.6g}); divide it by its sum")
    return kernel


def read_latent_kernel(path: Path, channels: int, hw: tuple) -> Optional[torch.Tensor]:
    """The nonlinear blur's latent kernel (1, channels, H/128, W/128) of measurement `path`, or None."""
    kernel_file = _companion(path, "kernel", (".pt", ".npy"))
    kernel = _read_array(kernel_file) if kernel_file is not None else _state_file(path, "kernel")
    if kernel is None:
        return None
    expected = (1, channels, hw[0] // 128, hw[1] // 128)
    if kernel.dim() == 3:
        kernel = kernel.unsqueeze(0)
    if tuple(kernel.shape) != expected:
        raise MeasurementError(f"latent kernel of '{path.name}' has shape {tuple(kernel.shape)}; this measurement "
                               f"needs {expected} (the KernelWizard latent for a {hw[1]}x{hw[0]} image)")
    return kernel
