"""Write the demo tuning images: training photographs prepared like the held-out demo images.

    python scripts/make_tuning_images.py [--out runs/tuning_images]

The demo purification configs are tuned on these, never on the held-out images of data/demo:
chelsea, rocket and camera (three of the demo prior's training photographs, colour and grey), each
centre-cropped to a square and resized to 256x256 with PIL bicubic (the recipe of data/demo, see
data/README.md), saved as 8-bit RGB PNG. Restore them with any demo config and `--data_root OUT`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guided_diffusion.training_data import load_skimage_images  # noqa: E402

TUNING_IMAGES = ("chelsea", "rocket", "camera")


def tuning_image(array: np.ndarray, size: int = 256):
    """Centre square of an (H, W, 3) uint8 array, resized to size x size with PIL bicubic."""
    from PIL import Image

    h, w = array.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = Image.fromarray(array[top:top + s, left:left + s])
    return square.resize((size, size), Image.BICUBIC)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tuning_images", help="folder to write the PNGs into")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, array in zip(TUNING_IMAGES, load_skimage_images(TUNING_IMAGES)):
        tuning_image(array).save(out / f"{name}.png")
    print(f"wrote {len(TUNING_IMAGES)} tuning images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
