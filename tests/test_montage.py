"""figures/montage.png of every run and collect_results.py --montage: size, panels and the numbers under them."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dcdp
from scripts import collect_results
from tests.test_driver import args, run_dir, setup  # noqa: F401  (setup is a fixture)
from util.image_io import load_image, save_image
from util.metrics import psnr
from util.montage import COLUMNS, PANEL_INCHES, restored_records, run_panels, write_run_montage


def test_a_run_writes_its_montage_and_the_dc_iterate_it_shows(setup):
    assert dcdp.main(args(setup, "--no_curves")) == 0
    root = run_dir(setup)
    with Image.open(root / "figures" / "montage.png") as im:  # 4 panels of 2.6 in at 100 dpi, 2 images
        assert im.size == (round(100 * PANEL_INCHES * 4), round(100 * (PANEL_INCHES * 2 + 0.9)))
    for i in (0, 1):
        record = json.loads((root / "metrics" / f"0000{i}.json").read_text())
        gt = load_image(root / "label" / f"0000{i}.png", "folder", None)
        dc = load_image(root / "dc" / f"0000{i}.png", "folder", None)
        recon = load_image(root / "recon" / f"0000{i}.png", "folder", None)
        # the saved pictures are the tensors the records were computed on, up to 8-bit rounding
        assert psnr(gt, dc)[0] == pytest.approx(record["psnr_before"], abs=0.05)
        assert psnr(gt, recon)[0] == pytest.approx(record["psnr"], abs=0.05)
        panels = run_panels(root, record)
        assert [p.caption for p in panels] == [
            f"img{i}.png", "8×8 (shown at 32×32)",
            f"PSNR {record['psnr_before']:.2f} dB / SSIM {record['ssim_before']:.3f}",
            f"PSNR {record['psnr']:.2f} dB / SSIM {record['ssim']:.3f}"]
        assert all(p.image.shape == (32, 32, 3) for p in panels)  # the 8×8 measurement shown at the image's size


def fake_run(root, n, shape_of_y=(3, 16, 16)):
    """A run folder with n restored 16×16 images whose records say PSNR 20 + i."""
    rng = np.random.default_rng(0)
    for i in range(n):
        name = f"{i:05d}"
        gt = torch.from_numpy(rng.uniform(-1, 1, (3, 16, 16))).float()
        y = (gt + 0.1 * torch.from_numpy(rng.standard_normal(shape_of_y)).float()).clamp(-1, 1)
        for sub, img in (("label", gt), ("input", y), ("dc", y), ("recon", gt)):
            save_image(img, root / sub / f"{name}.png")
        (root / "measurements").mkdir(exist_ok=True)
        torch.save(y, root / "measurements" / f"{name}.pt")
        (root / "metrics").mkdir(exist_ok=True)
        (root / "metrics" / f"{name}.json").write_text(json.dumps(
            {"index": i, "file": f"/d/im{i}.png", "status": "ok", "psnr": 20 + i, "ssim": 0.5, "psnr_before": 10 + i,
             "ssim_before": 0.25}))


def test_the_montage_shows_the_first_four_images_with_the_measurements_psnr(tmp_path):
    fake_run(tmp_path, 6)
    assert [r["index"] for r in restored_records(tmp_path, 4)] == [0, 1, 2, 3]
    path = write_run_montage(tmp_path)
    with Image.open(path) as im:
        assert im.size == (round(100 * PANEL_INCHES * len(COLUMNS)), round(100 * (PANEL_INCHES * 4 + 0.9)))
    record = json.loads((tmp_path / "metrics" / "00002.json").read_text())
    gt, meas, dc, out = run_panels(tmp_path, record)
    assert out.caption == "PSNR 22.00 dB / SSIM 0.500" and dc.caption == "PSNR 12.00 dB / SSIM 0.250"
    y = torch.load(tmp_path / "measurements" / "00002.pt")
    expected = psnr(load_image(tmp_path / "label" / "00002.png", "folder", None)[0], y)[0]
    assert meas.caption.startswith(f"PSNR {expected:.2f} dB")  # same shape as the image: scored


def test_a_missing_dc_picture_is_a_marked_panel_not_an_error(tmp_path):
    fake_run(tmp_path, 1)
    (tmp_path / "dc" / "00000.png").unlink()  # a folder resumed from before dc/ existed
    assert run_panels(tmp_path, restored_records(tmp_path, 1)[0])[2].image is None
    assert write_run_montage(tmp_path).is_file()


def test_collect_results_montage_has_one_row_per_run(setup, tmp_path, capsys):
    assert dcdp.main(args(setup, "--no_curves", "--max_images", "1")) == 0
    assert dcdp.main(args(setup, "--no_curves", "--max_images", "1", "--no_purification")) == 0
    out = tmp_path / "all.png"
    assert collect_results.main([str(setup["out"]), "--montage", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (round(100 * (PANEL_INCHES * 4 + 0.4)), round(100 * (PANEL_INCHES * 2 + 0.9)))
    assert "montage:" in capsys.readouterr().err
