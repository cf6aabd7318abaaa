"""The driver's randomness: each image of a run has its own noise, and a rerun is bit-identical.

A folder holds the same image twice. With measurement noise σ > 0 the two measurements must differ
(image i's noise comes from `torch.Generator().manual_seed(seed + i)`); with σ = 0 the measurements are
equal and the two restorations must still differ (different purification noise). A second run with
the same seed reproduces every saved tensor and PNG bit for bit.

Outputs are located by globbing for `summary.json` under the save dir: the run folder's name is the
driver's business. The tiny configs come from tests/test_driver.py.
"""
from pathlib import Path
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dcdp
from tests.test_driver import args, setup, write_images  # noqa: F401  (setup is a fixture)


def run_root(save_dir: Path) -> Path:
    found = list(save_dir.rglob("summary.json"))
    assert len(found) == 1, found
    return found[0].parent


def twin_images(setup) -> None:  # noqa: F811
    """img0.png and img1.png, byte-identical copies of one image."""
    for f in setup["data"].iterdir():
        f.unlink()
    write_images(setup["data"], 1)
    shutil.copy(setup["data"] / "img0.png", setup["data"] / "img1.png")


def set_sigma(setup, sigma: float) -> None:  # noqa: F811
    task = yaml.safe_load(setup["task"].read_text())
    task["measurement"]["noise"]["sigma"] = sigma
    setup["task"].write_text(yaml.safe_dump(task))


def restore(setup, save_dir: Path, *extra) -> dict:  # noqa: F811
    setup["out"] = save_dir
    assert dcdp.main(args(setup, "--no_curves", "--save_iterates", *extra)) == 0
    root = run_root(save_dir)
    out = {}
    for i in (0, 1):
        out[f"y{i}"] = torch.load(root / "measurements" / f"{i:05d}.pt")
        out[f"recon{i}"] = np.asarray(Image.open(root / "recon" / f"{i:05d}.png"), dtype=np.int64)
        out[f"recon{i}_bytes"] = (root / "recon" / f"{i:05d}.png").read_bytes()
        iterates = torch.load(root / "iterates" / f"{i:05d}.pt")
        out[f"iterates{i}"] = torch.stack(list(iterates)) if isinstance(iterates, (list, tuple)) else iterates
    return out


def test_two_identical_images_get_different_noise_and_reruns_are_identical(setup):  # noqa: F811
    twin_images(setup)
    set_sigma(setup, 0.05)
    a = restore(setup, setup["out"].parent / "noisy")
    assert (a["y0"] - a["y1"]).abs().max() > 1e-2, "both images got the same measurement noise"
    assert (a["iterates0"] - a["iterates1"]).abs().max() > 1e-2
    assert np.abs(a["recon0"] - a["recon1"]).max() > 0

    again = restore(setup, setup["out"].parent / "noisy_again")
    for i in (0, 1):
        assert torch.equal(again[f"y{i}"], a[f"y{i}"])
        assert torch.equal(again[f"iterates{i}"], a[f"iterates{i}"])
        assert again[f"recon{i}_bytes"] == a[f"recon{i}_bytes"]

    other_seed = restore(setup, setup["out"].parent / "seed7", "--seed", "7")
    assert (other_seed["y0"] - a["y0"]).abs().max() > 1e-2


def test_noiseless_twins_differ_by_purification_noise_only(setup):  # noqa: F811
    twin_images(setup)
    set_sigma(setup, 0.0)
    r = restore(setup, setup["out"].parent / "clean")
    assert torch.equal(r["y0"], r["y1"])                      # same image, no noise: same measurement
    it0, it1 = r["iterates0"], r["iterates1"]
    # the first data-consistency phase sees only y and x = 0: identical; purification noise then differs
    assert torch.equal(it0[:2], it1[:2])
    assert (it0[2] - it1[2]).abs().max() > 1e-2, "both images got the same purification noise"
    assert np.abs(r["recon0"] - r["recon1"]).max() > 0
