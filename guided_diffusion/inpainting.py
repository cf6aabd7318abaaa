"""The inpainting operator: A(x) = x ⊙ mask, with the official box, a random mask per image, or a mask file.
Registered lazily in `measurements.__OPERATORS__` as "inpainting"."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .measurements import Device, Operator, _check_int, _image_hw, register_operator

# ---- inpainting ----

MASK_TYPES = ("box", "random", "file")
MASK_OPT_KEYS = ("mask_type", "box", "path", "mask_len_range", "mask_prob_range", "image_size", "margin")
_MASK_KEYS_BY_TYPE = {"box": ("box", "mask_len_range", "margin"), "random": ("mask_prob_range",), "file": ("path",)}
# The official pixel driver's hole: rows and columns 100..199 of a 256×256 image. Other sizes get the
# same box scaled proportionally (rows round(100·H/256) .. round(200·H/256) - 1, likewise columns).
_OFFICIAL_HOLE = (100 / 256, 200 / 256)


def _pair(value, name: str, kind: type) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"inpainting: mask_opt.{name} must be a pair [a, b], got {value!r}")
    try:
        return tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"inpainting: mask_opt.{name} must hold two {kind.__name__}s, got {value!r}") from None


@register_operator("inpainting")
class InpaintingOperator(Operator):
    """A(x) = x ⊙ mask, mask = 1 where a pixel is observed and 0 where it is missing (same in every channel).

    `mask_opt` (all keys optional):
      mask_type: "box" (default), "random" or "file".
      box: [top, left, height, width], a fixed hole. Without `box` (and without `mask_len_range`) the
        hole is the official one: rows/cols 100..199 at 256×256, scaled proportionally for other sizes.
      mask_len_range: [lo, hi): box only; a random hole per image with sides drawn uniformly in
        [lo, hi) and placed uniformly at least `margin` = [top/bottom, left/right] (default [16, 16])
        pixels from the border (DPS's random box).
      mask_prob_range: [lo, hi], random only (default [0.3, 0.7]): per image p ~ U(lo, hi) and
        int(p·H·W) pixels, chosen uniformly, are missing (DPS's random mask).
      path: file only; a greyscale image, white (>= 128) = observed, resized (nearest) to the image.
      image_size: the official size hint; masks always follow the actual image size.

    Every mask comes from `draw_state(generator, shape)` -> {"mask": (1, C, H, W)}; `forward(x)`
    without a mask uses the fixed mask (box or file) for x's size.
    """

    is_linear = True

    def __init__(self, mask_opt: dict | None = None, device: Device = "cpu"):
        opt = dict(mask_opt or {})
        unknown = [k for k in opt if k not in MASK_OPT_KEYS]
        if unknown:
            raise ValueError(f"inpainting: unknown mask_opt key(s) {', '.join(map(str, unknown))}; "
                             f"valid keys: {', '.join(MASK_OPT_KEYS)}")
        self.mask_type = opt.get("mask_type", "box")
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"inpainting: unknown mask_type '{self.mask_type}'; valid: {', '.join(MASK_TYPES)}")
        stray = [k for k in opt if k not in ("mask_type", "image_size") + _MASK_KEYS_BY_TYPE[self.mask_type]]
        if stray:
            raise ValueError(f"inpainting: mask_opt key(s) {', '.join(stray)} do not apply to mask_type "
                             f"'{self.mask_type}', which takes: {', '.join(_MASK_KEYS_BY_TYPE[self.mask_type])}")
        if "box" in opt and "mask_len_range" in opt:
            raise ValueError("inpainting: give either mask_opt.box (a fixed hole) or mask_opt.mask_len_range "
                             "(a random hole), not both")
        if "margin" in opt and "mask_len_range" not in opt:
            raise ValueError("inpainting: mask_opt.margin applies only to random boxes; add mask_len_range "
                             "or remove margin")
        self.device = torch.device(device)
        self.box = self._parse_box(opt.get("box"))
        self.len_range = self._parse_len_range(opt.get("mask_len_range"))
        self.margin = _pair(opt.get("margin", (16, 16)), "margin", int)
        self.prob_range = self._parse_prob_range(opt.get("mask_prob_range", (0.3, 0.7)))
        self._file_image = _read_mask_image(opt.get("path")) if self.mask_type == "file" else None
        self._fixed: dict[tuple, torch.Tensor] = {}

    @property
    def is_random(self) -> bool:
        """Whether masks differ per image (drawn from the image's generator)."""
        return self.mask_type == "random" or (self.mask_type == "box" and self.len_range is not None)

    @staticmethod
    def _parse_box(box) -> tuple[int, int, int, int] | None:
        if box is None:
            return None
        if isinstance(box, (str, bytes)) or not hasattr(box, "__len__") or len(box) != 4:
            raise ValueError(f"inpainting: mask_opt.box must be [top, left, height, width], got {box!r}")
        top, left, height, width = (_check_int(v, "box entries", "inpainting", minimum=0) for v in box)
        if height < 1 or width < 1:
            raise ValueError(f"inpainting: mask_opt.box height and width must be >= 1, got {list(box)}")
        return top, left, height, width

    @staticmethod
    def _parse_len_range(value) -> tuple[int, int] | None:
        if value is None:
            return None
        lo, hi = _pair(value, "mask_len_range", int)
        if not 1 <= lo < hi:
            raise ValueError(f"inpainting: mask_opt.mask_len_range must be [lo, hi) with 1 <= lo < hi, got {value!r}")
        return lo, hi

    @staticmethod
    def _parse_prob_range(value) -> tuple[float, float]:
        lo, hi = _pair(value, "mask_prob_range", float)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"inpainting: mask_opt.mask_prob_range must be [lo, hi] with 0 <= lo <= hi <= 1, "
                             f"got {value!r}")
        return lo, hi

    def draw_state(self, generator: torch.Generator, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        """{"mask": (1, C, H, W) float32 in {0, 1}} for an image of shape (..., C, H, W), on `self.device`."""
        h, w = _image_hw(shape, "inpainting.draw_state")
        channels = int(shape[-3]) if len(shape) >= 3 else 3
        if self.mask_type == "random":
            mask = self._random_pixels(generator, h, w)
        elif self.mask_type == "file":
            mask = self._file_mask(h, w)
        elif self.len_range is not None:
            mask = self._random_box(generator, h, w)
        else:
            mask = self._box_mask(h, w)
        return {"mask": mask.expand(1, channels, h, w).contiguous().to(self.device)}

    def _box_mask(self, h: int, w: int) -> torch.Tensor:
        if self.box is None:
            (r0, c0), (r1, c1) = ((round(f * h), round(f * w)) for f in _OFFICIAL_HOLE)
        else:
            top, left, height, width = self.box
            r0, c0, r1, c1 = top, left, top + height, left + width
            if r1 > h or c1 > w:
                raise ValueError(f"inpainting: mask_opt.box {list(self.box)} does not fit in a {h}x{w} image")
        mask = torch.ones(h, w)
        mask[r0:r1, c0:c1] = 0
        return mask

    def _random_box(self, generator: torch.Generator, h: int, w: int) -> torch.Tensor:
        lo, hi = self.len_range
        box_h, box_w = (int(v) for v in torch.randint(lo, hi, (2,), generator=generator))
        (m_h, m_w) = self.margin
        if h - m_h - box_h <= m_h or w - m_w - box_w <= m_w:
            raise ValueError(f"inpainting: a {box_h}x{box_w} hole with margin {list(self.margin)} does not fit "
                             f"in a {h}x{w} image; reduce mask_len_range or margin")
        top = int(torch.randint(m_h, h - m_h - box_h, (1,), generator=generator))
        left = int(torch.randint(m_w, w - m_w - box_w, (1,), generator=generator))
        mask = torch.ones(h, w)
        mask[top:top + box_h, left:left + box_w] = 0
        return mask

    def _random_pixels(self, generator: torch.Generator, h: int, w: int) -> torch.Tensor:
        lo, hi = self.prob_range
        p = lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))
        missing = torch.randperm(h * w, generator=generator)[: int(p * h * w)]
        mask = torch.ones(h * w)
        mask[missing] = 0
        return mask.view(h, w)

    def _file_mask(self, h: int, w: int) -> torch.Tensor:
        from PIL import Image

        resized = self._file_image.resize((w, h), resample=Image.NEAREST)
        return torch.from_numpy((np.asarray(resized) >= 128).astype(np.float32))

    def _mask_for(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            return mask
        if self.is_random:
            raise ValueError(f"inpainting: mask_type '{self.mask_type}' draws a mask per image; pass "
                             f"mask=operator.draw_state(generator, x.shape[1:])['mask']")
        key = (tuple(x.shape[-3:]), x.device, x.dtype)
        if key not in self._fixed:
            mask = self.draw_state(torch.Generator(), x.shape[-3:])["mask"]
            self._fixed[key] = mask.to(device=x.device, dtype=x.dtype)
        return self._fixed[key]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, **state: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), mask (B or 1, C or 1, H, W) -> x ⊙ mask."""
        return x * self._mask_for(x, mask)

    def transpose(self, y: torch.Tensor, mask: torch.Tensor | None = None, **state: torch.Tensor) -> torch.Tensor:
        """The mask is diagonal, so Aᵀ = A."""
        return y * self._mask_for(y, mask)


def _read_mask_image(path):
    """The mask file as a greyscale PIL image."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        raise ValueError("inpainting: mask_type 'file' needs mask_opt.path, a greyscale image (white = observed)")
    try:
        with Image.open(Path(path)) as image:
            return image.convert("L")
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"inpainting: cannot read mask_opt.path '{path}' ({exc.__class__.__name__}); give a "
                         f"greyscale image file where white = observed, black = missing") from None
