"""Write the demo tuning images: a validation split, neither trained on nor held out.

    python scripts/make_tuning_images.py [--out runs/tuning_images]

The demo purification configs are tuned on these, never on the held-out images of data/demo. They are
photographs that scikit-image ships but that the demo prior was not trained on (they are left out of its
training set, see models/README_demo.md): the left and right squares of `stereo_motorcycle`'s left view
(colour) and the centre square of `coins` (grey), each resized to 256x256 with PIL bicubic (the recipe of
data/demo, see data/README.md) and saved as 8-bit RGB PNG. They are read from the installed scikit-image
and not shipped. Restore them with any demo config and `--data_root OUT`.

Tuning on the prior's own training photographs misleads: the prior restores the images it was trained on
better than unseen ones, so they favour settings that trust it more (on 2026-12-03 settings that gained
0.8 dB on chelsea/rocket/camera lost 0.3 dB on the held-out images).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guided_diffusion.training_data import HELD_OUT, SKIMAGE_TRAINING_IMAGES, to_rgb_uint8  # noqa: E402


def squares(array: np.ndarray, where: str) -> np.ndarray:
    """The left, right or centre square of an (H, W, 3) array."""
    h, w = array.shape[:2]
    s = min(h, w)
    top = (h - s) // 2
    left = {"left": 0, "right": w - s, "centre": (w - s) // 2}[where]
    return array[top:top + s, left:left + s]


def tuning_images() -> dict:
    """name -> 256x256 PIL image."""
    import skimage.data
    from PIL import Image

    motorcycle = to_rgb_uint8(skimage.data.stereo_motorcycle()[0])
    coins = to_rgb_uint8(skimage.data.coins())
    crops = {"motorcycle_left": squares(motorcycle, "left"), "motorcycle_right": squares(motorcycle, "right"),
             "coins": squares(coins, "centre")}
    return {name: Image.fromarray(np.ascontiguousarray(a)).resize((256, 256), Image.BICUBIC) for name, a in crops.items()}


SOURCES = ("stereo_motorcycle", "coins")
assert not set(SOURCES) & ({im.name for im in SKIMAGE_TRAINING_IMAGES} | set(HELD_OUT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tuning_images", help="folder to write the PNGs into")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = tuning_images()
    for name, image in images.items():
        image.save(out / f"{name}.png")
    print(f"wrote {len(images)} tuning images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
