"""Make the example measurements of data/measurements/ from the demo images (README: Restore your own images).

    python scripts/make_measurement_examples.py
    python scripts/make_measurement_examples.py --figure purification_results   # after the README's runs

Each example is y = A(x) + n with the task's operator and Gaussian noise σ = 0.05 (seed 0), saved as an
8-bit PNG, beside the mask or kernel it needs. x is a demo image of data/demo (public domain / CC0, see
data/README.md), at 256×256 for super-resolution (y is 64×64) and reduced to 128×128 (PIL bicubic) for
the others, to keep the files small (64×64 for phase retrieval, whose y is a .npy tensor of magnitudes).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guided_diffusion.measurements import MotionBlurOperator, get_noise, get_operator  # noqa: E402
from motionblur import motion_kernel  # noqa: E402
from util.image_io import load_image, save_image  # noqa: E402

OUT = ROOT / "data" / "measurements"
SIGMA = 0.05


def demo(name: str, size: int) -> torch.Tensor:
    return load_image(ROOT / "data" / "demo" / f"{name}.png", "folder", size)      # (1, 3, size, size)


def measure(operator, x: torch.Tensor, seed: int = 0, **state) -> torch.Tensor:
    with torch.no_grad():
        return get_noise("gaussian", sigma=SIGMA)(operator.forward(x, **state), torch.Generator().manual_seed(seed))


def main() -> None:
    for sub in ("super_resolution", "denoising", "gaussian_deblur", "motion_deblur", "inpainting", "phase_retrieval"):
        (OUT / sub).mkdir(parents=True, exist_ok=True)
    # super-resolution x4: a 64x64 image of the 256x256 astronaut (the demo task's operator)
    save_image(measure(get_operator("super_resolution", scale_factor=4), demo("astronaut", 256)),
               OUT / "super_resolution" / "astronaut_64.png")
    # denoising: the 128x128 coffee with sigma 0.05 noise
    save_image(measure(get_operator("noise"), demo("coffee", 128)), OUT / "denoising" / "coffee_128.png")
    # Gaussian deblur: the demo task's kernel (61x61, std 3), which the task YAML gives: no kernel file
    save_image(measure(get_operator("gaussian_blur", kernel_size=61, intensity=3.0), demo("astronaut", 128)),
               OUT / "gaussian_deblur" / "astronaut_128.png")
    # motion deblur: a 31x31 motion kernel (seed 7) shipped as a PNG beside the image (divided by its sum on reading)
    kernel = motion_kernel(31, 0.5, np.random.default_rng(7))
    picture = np.round(kernel / kernel.max() * 255).astype(np.uint8)
    Image.fromarray(picture).save(OUT / "motion_deblur" / "coffee_128.kernel.png")
    stored = torch.from_numpy(picture.astype(np.float64) / picture.sum()).float()  # the kernel as it is read back
    blur = MotionBlurOperator.from_kernel(stored)
    save_image(measure(blur, demo("coffee", 128)), OUT / "motion_deblur" / "coffee_128.png")
    # inpainting: two strokes and a block of the 128x128 astronaut missing; white = known
    mask = np.full((128, 128), 255, np.uint8)
    mask[20:30, 10:118] = 0
    mask[60:110, 70:100] = 0
    for r in range(128):
        mask[r, max(0, r // 2 + 5): r // 2 + 12] = 0
    Image.fromarray(mask).save(OUT / "inpainting" / "astronaut_128.mask.png")
    m = torch.from_numpy(mask >= 128).float().expand(1, 3, 128, 128)
    save_image(measure(get_operator("inpainting"), demo("astronaut", 128), mask=m),
               OUT / "inpainting" / "astronaut_128.png")
    # phase retrieval: the Fourier magnitudes of the 64x64 coffee, oversampled 2 (the official operator: a
    # (1, 3, 96, 96) tensor), with sigma 0.05 noise, as a .npy file (a picture cannot hold magnitudes)
    y = measure(get_operator("phase_retrieval", oversample=2.0), demo("coffee", 64))
    np.save(OUT / "phase_retrieval" / "coffee_64.npy", y.numpy().astype(np.float32))
    print(f"written under {OUT}")


# the README's figure: a row per task, the measurement as given and the restoration
FIGURE_ROWS = ("super_resolution", "denoising:noise", "gaussian_deblur:gaussian_blur", "motion_deblur:motion_blur",
               "inpainting", "phase_retrieval")
FIGURE = ROOT / "docs" / "measurement_examples.jpg"


def figure(save_dir: Path, cell: int = 128) -> None:
    sheet = Image.new("RGB", (2 * cell, cell * len(FIGURE_ROWS)), "white")
    for row, entry in enumerate(FIGURE_ROWS):
        sub, _, operator = entry.partition(":")
        runs = sorted((save_dir / (operator or sub) / "measurements").glob("*/*/recon/00000.png"))
        if not runs:
            raise SystemExit(f"no restored {sub} example under {save_dir}; run the README's command for it first")
        run = runs[-1].parent.parent
        for col, picture in enumerate((run / "input" / "00000.png", run / "recon" / "00000.png")):
            with Image.open(picture) as img:
                sheet.paste(img.convert("RGB").resize((cell, cell), Image.LANCZOS if col else Image.NEAREST),
                            (col * cell, row * cell))
    sheet.save(FIGURE, quality=75, optimize=True)
    print(f"written {FIGURE}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--figure", type=Path, metavar="SAVE_DIR", help="compose docs/measurement_examples.jpg "
                        "from the README's restorations under SAVE_DIR instead of making the measurements")
    options = parser.parse_args()
    figure(options.figure) if options.figure else main()
