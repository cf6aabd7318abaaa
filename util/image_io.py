"""Reading images of any size and mode, saving pictures, and atomic writes.

Datasets (the `dataset.name` of a purification config, or `--dataset`):

| name       | files (case-insensitive, recursive, sorted)   | sizing to `image_size`                       |
|------------|-----------------------------------------------|----------------------------------------------|
| `ffhq`     | `*.png`                                       | centre crop to a square, PIL bicubic resize  |
| `ImageNet` | `*.jpeg`, `*.jpg`                             | PIL bicubic resize of the whole image        |
| `folder`   | png, jpg, jpeg, bmp, tif, tiff, webp          | centre crop to a square, PIL bicubic resize  |

The official code requires FFHQ images to be 256x256 already; cropping and resizing other sizes is
our addition and is logged. Its ImageNet loader resizes directly to 256x256 and so distorts the aspect
ratio; we keep that for faithfulness. Hidden files and folders (names starting with '.') are skipped,
as the official `glob('**')` does.

Pixel values become float32 in [-1, 1] exactly as torchvision's `ToTensor()` + `Normalize(0.5, 0.5)`:
`(u8 / 255 - 0.5) / 0.5`. Modes other than RGB are converted: grayscale and 1-bit are replicated to
three channels, palette and CMYK go through PIL's conversion, 16-bit grayscale is scaled by 1/65535
(not clipped at 255 as PIL's own conversion would), and images with an alpha channel (RGBA, LA, PA,
palette with transparency) are composited on a white background.
"""
from __future__ import annotations

import logging
import os
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from util.errors import DCDPError

log = logging.getLogger(__name__)


class ImageError(DCDPError, ValueError):
    """An image file is missing, corrupt, truncated or of an unsupported kind."""


@dataclass(frozen=True)
class DatasetSpec:
    extensions: frozenset[str]  # lower-case suffixes with the dot
    crop_to_square: bool  # True: centre crop then resize; False: resize the whole image (aspect changes)
    exif_transpose: bool  # apply the EXIF orientation tag (camera photos); the official loaders do not


DATASETS: dict[str, DatasetSpec] = {
    "ffhq": DatasetSpec(frozenset({".png"}), crop_to_square=True, exif_transpose=False),
    "celeb": DatasetSpec(frozenset({".png"}), crop_to_square=True, exif_transpose=False),  # DCDP-LDM's name for PNGs
    "ImageNet": DatasetSpec(frozenset({".jpeg", ".jpg"}), crop_to_square=False, exif_transpose=False),
    "folder": DatasetSpec(
        frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}), crop_to_square=True, exif_transpose=True
    ),
}

# What PIL raises for unreadable files: OSError (incl. UnidentifiedImageError, truncation), SyntaxError
# (broken PNG chunks), struct.error / EOFError / ValueError (malformed headers), and decompression bombs.
_PIL_READ_ERRORS = (OSError, SyntaxError, struct.error, EOFError, ValueError, Image.DecompressionBombError)


def _dataset_spec(dataset_name: str) -> DatasetSpec:
    if dataset_name not in DATASETS:
        raise ValueError(f"unknown dataset '{dataset_name}'; valid names: {', '.join(DATASETS)} (set dataset.name in the purification config, or --dataset)")
    return DATASETS[dataset_name]


# ----------------------------------------------------------------------------------------------
# Listing and loading
# ----------------------------------------------------------------------------------------------

def list_images(root: str | os.PathLike, dataset_name: str) -> list[Path]:
    """Every image file of `dataset_name`'s kinds under `root` (recursive), sorted by path string.

    Raises ValueError for an unknown dataset name, FileNotFoundError for a missing folder and
    ValueError for a folder without matching images; each message names the folder.
    """
    spec = _dataset_spec(dataset_name)
    root = Path(root)
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"image folder '{root}' {problem}; create it or set dataset.root in the purification config (or --data_root)")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and os.path.splitext(f)[1].lower() in spec.extensions
        ]
    if not found:
        kinds = ", ".join(sorted("*" + e for e in spec.extensions))
        raise ValueError(f"no {kinds} images under '{root}' (dataset '{dataset_name}'); add images there or set dataset.root / dataset.name (or --data_root / --dataset)")
    return [Path(p) for p in sorted(found)]


def load_image(path: str | os.PathLike, dataset_name: str, image_size: int | None) -> torch.Tensor:
    """Read one image as a (1, 3, H, W) float32 tensor in [-1, 1].

    `image_size` None keeps the file's size; otherwise the result is image_size x image_size, sized as
    the dataset's mode says (see the module docstring). Raises ImageError naming the file if it cannot
    be read.
    """
    spec = _dataset_spec(dataset_name)
    path = Path(path)
    img = _open_rgb(path, exif_transpose=spec.exif_transpose)  # mode "RGB", or "F" with values in [0, 1]
    if image_size is not None:
        img = _fit(img, image_size, spec.crop_to_square, path)
    return _to_tensor(img)


def load_image_as_is(path: str | os.PathLike) -> torch.Tensor:
    """Read one image at its own size and orientation (no EXIF rotation), (1, 3, H, W) in [-1, 1]: a measurement."""
    return _to_tensor(_open_rgb(Path(path), exif_transpose=False))


def _open_rgb(path: Path, exif_transpose: bool) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()  # decode now so that truncation surfaces here
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return _convert(img, path)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image file '{path}' not found; check dataset.root (or --data_root) and the file list") from None
    except _PIL_READ_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"cannot read image '{path}' ({reason}); the file is corrupt or not an image, replace or remove it") from None


def _convert(img: Image.Image, path: Path) -> Image.Image:
    """Any PIL mode -> "RGB" (8-bit) or "F" (one float channel in [0, 1], for 16/32-bit grayscale)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        return Image.fromarray(np.asarray(img, dtype=np.float32) / 65535.0)  # mode "F"
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0))
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"image '{path}' has unsupported mode {img.mode} ({exc}); convert it to RGB PNG") from None


def _fit(img: Image.Image, size: int, crop_to_square: bool, path: Path) -> Image.Image:
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if crop_to_square and w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        log.info("%s: %dx%d centre-cropped to %dx%d and resized to %dx%d (bicubic)", path, w, h, side, side, size, size)
    else:
        log.info("%s: %dx%d resized to %dx%d (bicubic)", path, w, h, size, size)
    return img.resize((size, size), resample=Image.BICUBIC)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    if img.mode == "F":
        x = torch.from_numpy(np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0))[None].expand(3, -1, -1)
    else:
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)  # (3, H, W) in [0, 1]
    return x.sub(0.5).div(0.5).unsqueeze(0).contiguous()  # (1, 3, H, W) in [-1, 1]


# ----------------------------------------------------------------------------------------------
# Saving pictures
# ----------------------------------------------------------------------------------------------

def _single_image(tensor: torch.Tensor, path: str | os.PathLike) -> torch.Tensor:
    x = tensor.detach().cpu()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"cannot save '{path}': expected a (3, H, W), (1, 3, H, W) or one-channel tensor, got shape {tuple(tensor.shape)}")
    return x


def _write_png(u8: np.ndarray, path: str | os.PathLike) -> None:
    """u8: (C, H, W) uint8 with C in {1, 3}."""
    img = Image.fromarray(u8[0] if u8.shape[0] == 1 else u8.transpose(1, 2, 0))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_image(tensor: torch.Tensor, path: str | os.PathLike) -> None:
    """Save a (3, H, W) or (1, 3, H, W) image in [-1, 1] as an 8-bit RGB PNG, atomically.

    Values are clipped to [-1, 1], mapped by (v + 1) / 2 and rounded to the nearest of 256 levels.
    """
    x = _single_image(tensor, path).float()
    u8 = ((x.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    _write_png(u8.numpy(), path)


def save_normalized(tensor: torch.Tensor, path: str | os.PathLike) -> None:
    """Save a measurement of any range as a min-max normalised PNG, atomically.

    `tensor`: (C, H, W) or (1, C, H, W), C in {1, 3}; complex values are shown by magnitude. The whole
    tensor is mapped to [0, 1] with one min and max (as the official figures/measurements.png); a
    constant tensor is saved black.
    """
    x = _single_image(tensor, path)
    x = (x.abs() if x.is_complex() else x).double()
    if not torch.isfinite(x).all():
        raise ValueError(f"cannot save '{path}': the tensor holds NaN or inf values")
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    _write_png((x * 255).round().to(torch.uint8).numpy(), path)


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------

def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and `os.replace` it into place.

    The parent folder is created if needed. If the body raises, the temporary file is removed and
    `path` is left as it was (absent or the previous complete file). The temporary name starts with
    '.' so that `list_images` skips it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        _fsync_path(path.parent, directory=True)  # make the rename itself durable
    except OSError:  # some filesystems (and Windows) cannot fsync a directory; the file is in place
        pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (readers see the old file or the whole new one)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_save_torch(obj: object, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
