"""Training images for the demo prior and the random, augmented crops drawn from them.

The default image set is the natural photographs that scikit-image ships inside its wheel under a
public-domain or CC0 licence (no download). astronaut and coffee are the held-out evaluation images
and are never part of it. Greyscale images are replicated to three channels.

All randomness comes from the `torch.Generator` passed to `RandomCrops.sample`, so a run is
reproducible and can be resumed exactly by restoring the generator's state.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from util.errors import ConfigError
from util.image_io import DATASETS

IMAGE_SUFFIXES = DATASETS["folder"].extensions  # what dcdp.py reads from a folder
HELD_OUT = ("astronaut", "coffee")  # the evaluation images in data/demo/


class TrainingDataError(ConfigError):
    """The training images (the training config's `data`, `crop_size`, `scale_range`, `grey_weight`) cannot be used."""


class MissingTrainingData(TrainingDataError, FileNotFoundError):
    """The training config's `data` folder does not exist."""


@dataclass(frozen=True)
class SkimageImage:
    """One training photograph shipped with scikit-image: `skimage.data.<name>()`."""

    name: str
    description: str
    licence: str


# Every photograph in the scikit-image wheel whose docstring states public domain or CC0.
SKIMAGE_TRAINING_IMAGES: tuple[SkimageImage, ...] = (
    SkimageImage("chelsea", "Chelsea the cat, colour, 300x451", "CC0 (photographer Stefan van der Walt)"),
    SkimageImage("rocket", "Falcon 9 launch of DSCOVR, colour, 427x640", "public domain (SpaceX)"),
    SkimageImage("hubble_deep_field", "Hubble eXtreme Deep Field, colour, 872x1000", "public domain (NASA)"),
    SkimageImage("retina", "fundus photograph of a human retina, colour, 1411x1411", "CC0 (Mikael Häggström, Wikimedia)"),
    SkimageImage("camera", "man with a camera, grey, 512x512", "CC0 (photographer Lav Varshney)"),
    SkimageImage("brick", "brick wall, grey, 512x512", "CC0 (CC0Textures Bricks25)"),
    SkimageImage("grass", "grass, grey, 512x512", "CC0 (DeviantArt linolafett, Grass-01)"),
    SkimageImage("gravel", "gravel, grey, 512x512", "CC0 (CC0Textures Gravel04)"),
)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any 2-D or 3-D image array → (H, W, 3) uint8.

    Greyscale is replicated to three channels, an alpha channel is dropped; uint16 is scaled by
    1/257, floats are read as [0, 1] and clipped.
    """
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise TrainingDataError(f"training image: expected (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    a = a[..., :3] if a.shape[-1] == 4 else a
    a = np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.uint16:
        return np.round(a / 257.0).astype(np.uint8)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.floating):
        return np.round(np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise TrainingDataError(f"training image: unsupported dtype {a.dtype}; use uint8, uint16 or floats in [0, 1]")


def load_skimage_images(names: Sequence[str] | None = None) -> list[np.ndarray]:
    """The scikit-image training photographs as (H, W, 3) uint8 arrays (all of them by default)."""
    import skimage.data

    known = [im.name for im in SKIMAGE_TRAINING_IMAGES]
    names = known if names is None else list(names)
    bad = [n for n in names if n not in known]
    if bad:
        raise TrainingDataError(f"training data: {bad} are not training images; valid names are {known} "
                         f"({', '.join(HELD_OUT)} are held out for evaluation)")
    return [to_rgb_uint8(getattr(skimage.data, n)()) for n in names]


def load_folder(path: str | os.PathLike) -> list[np.ndarray]:
    """Every image file directly inside `path` (sorted by name) as (H, W, 3) uint8 arrays."""
    from PIL import Image

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingTrainingData(f"training data: folder '{path}' does not exist; set data: in the training config "
                                  f"to a folder of images, or to skimage (the scikit-image photographs)")
    files = sorted(f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainingDataError(f"training data: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in '{path}'; "
                                f"put the training images there, or set data: skimage in the training config")
    images = []
    for f in files:
        file = os.path.join(path, f)
        try:
            with Image.open(file) as im:
                images.append(to_rgb_uint8(np.asarray(im.convert("RGB"))))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # PIL: UnidentifiedImageError, truncated
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise TrainingDataError(f"training data: cannot read image '{file}' ({reason}); replace or remove it") from None
    return images


def load_images(source: str | os.PathLike | Sequence[np.ndarray]) -> list[np.ndarray]:
    """"skimage" → the scikit-image photographs; a folder path → its images; arrays → converted."""
    if isinstance(source, (str, os.PathLike)):
        return load_skimage_images() if os.fspath(source) == "skimage" else load_folder(source)
    return [to_rgb_uint8(a) for a in source]


def _is_grey(image: np.ndarray) -> bool:
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


class RandomCrops:
    """Random square crops with random rescaling, flips and 90° rotations.

    Args:
        images: "skimage", a folder, or a list of images (any layout `to_rgb_uint8` accepts).
        crop_size: side of the returned crops in pixels.
        scale_range: (min, max) zoom factor, drawn log-uniformly per crop. A crop of
            crop_size / scale pixels is taken and resized (bicubic, antialiased) to crop_size, so
            scales below 1 show the image zoomed out. Clamped so the region fits in the image.
        grey_weight: how often a greyscale image is drawn relative to a colour one.
    """

    def __init__(
        self,
        images: str | os.PathLike | Sequence[np.ndarray],
        crop_size: int,
        scale_range: tuple[float, float] = (0.5, 1.0),
        grey_weight: float = 1.0,
    ):
        self.images = [torch.tensor(a).permute(2, 0, 1).contiguous() for a in load_images(images)]  # (3, H, W) uint8
        self.crop_size = int(crop_size)
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise TrainingDataError(f"training data: scale_range must satisfy 0 < min <= max, got {list(scale_range)}")
        self.log_scale_range = (math.log(lo), math.log(hi))
        small = [f"#{i} ({im.shape[1]}x{im.shape[2]})" for i, im in enumerate(self.images) if min(im.shape[1:]) < self.crop_size]
        if small:
            raise TrainingDataError(f"training data: images {', '.join(small[:5])} are smaller than crop_size="
                                    f"{self.crop_size} (images in name order); lower crop_size or use larger images")
        if grey_weight < 0:
            raise TrainingDataError(f"training data: grey_weight must be >= 0, got {grey_weight}")
        w = [grey_weight if _is_grey(im.permute(1, 2, 0).numpy()) else 1.0 for im in self.images]
        self.weights = torch.tensor(w, dtype=torch.float64)
        if self.weights.sum() <= 0:
            raise TrainingDataError("training data: every image has weight 0 (all greyscale and grey_weight=0); "
                                    "raise grey_weight or add colour images")

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size, 3, crop_size, crop_size) float32 crops in [-1, 1], drawn with `generator` (CPU)."""
        return torch.stack([self._one(generator) for _ in range(batch_size)])

    def _one(self, g: torch.Generator) -> torch.Tensor:
        c = self.crop_size
        image = self.images[int(torch.multinomial(self.weights, 1, generator=g))]
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        scale = math.exp(self.log_scale_range[0] + u * (self.log_scale_range[1] - self.log_scale_range[0]))
        H, W = image.shape[1:]
        r = min(max(round(c / scale), 1), H, W)  # side of the source region
        top = int(torch.randint(H - r + 1, (), generator=g))
        left = int(torch.randint(W - r + 1, (), generator=g))
        k = int(torch.randint(4, (), generator=g))
        flip = bool(torch.randint(2, (), generator=g))

        x = image[:, top:top + r, left:left + r].float()[None]  # (1, 3, r, r) in [0, 255]
        if r != c:
            x = F.interpolate(x, size=(c, c), mode="bicubic", align_corners=False, antialias=True)
        x = x[0].clamp(0.0, 255.0) / 127.5 - 1.0
        x = torch.rot90(x, k, dims=(1, 2))
        return x.flip(2) if flip else x
