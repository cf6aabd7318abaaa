"""Restoring given measurements (`dcdp.py --measurements DIR`, issue 14) with the tiny random UNet."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dcdp
from tests.test_driver import args, run_dir, setup, write_images  # noqa: F401  (fixture)
from runner.measurement_restore import PaddedPrior

ROOT = Path(__file__).resolve().parent.parent
RANDOM_SMALL = "./bkse/options/generate_blur/random_small.yml"
TASKS = {  # operator block, image size
    "super_resolution": ({"name": "super_resolution", "in_shape": [1, 3, 32, 32], "scale_factor": 4}, 32),
    "denoising": ({"name": "noise"}, 32),
    "inpainting_random": ({"name": "inpainting", "mask_opt": {"mask_type": "random"}}, 32),
    "inpainting_box": ({"name": "inpainting", "mask_opt": {"box": [8, 8, 12, 10]}}, 32),
    "gaussian_blur": ({"name": "gaussian_blur", "kernel_size": 5, "intensity": 1.0}, 32),
    "motion_blur": ({"name": "motion_blur", "kernel_size": 5, "intensity": 0.5, "seed": 3}, 32),
    "phase_retrieval": ({"name": "phase_retrieval", "oversample": 2.0}, 32),
    "nonlinear_blur": ({"name": "nonlinear_blur", "opt_yml_path": RANDOM_SMALL}, 128),
}


def set_task(p, operator: dict, size: int = 32, sigma: float = 0.05) -> None:
    task = {"measurement": {"operator": operator, "noise": {"name": "gaussian", "sigma": sigma}}}
    p["task"].write_text(yaml.safe_dump(task))
    pur = yaml.safe_load(p["pur"].read_text())
    pur["others"]["img_size"] = [1, 3, size, size]
    p["pur"].write_text(yaml.safe_dump(pur))
    if size != 32:
        shutil.rmtree(p["data"])
        write_images(p["data"], 2, size)


def given(p, folder: Path, *extra):
    return args(dict(p, out=p["out"].parent / "given"), "--no_curves", "--measurements", str(folder), *extra)


def given_dir(p) -> Path:
    return next((p["out"].parent / "given").glob("*/*/*/*"))


def as_measurement_folder(bench: Path, folder: Path) -> Path:
    """The benchmark path's files in the measurement-folder layout: NAME.pt, NAME.state.pt, operator_state.pt."""
    folder.mkdir()
    for f in (bench / "measurements").glob("*.pt"):
        shutil.copy(f, folder / f.name)
    for f in (bench / "states").glob("*.pt"):
        shutil.copy(f, folder / f"{f.stem}.state.pt")
    if (bench / "operator_state.pt").is_file():
        shutil.copy(bench / "operator_state.pt", folder / "operator_state.pt")
    return folder


@pytest.mark.parametrize("task", TASKS)
def test_round_trip_gives_the_benchmark_result_bit_for_bit(setup, tmp_path, task):
    operator, size = TASKS[task]
    set_task(setup, operator, size)
    assert dcdp.main(args(setup, "--no_curves", "--save_iterates")) == 0
    bench = run_dir(setup)
    folder = as_measurement_folder(bench, tmp_path / "y")
    assert dcdp.main(given(setup, folder, "--save_iterates")) == 0
    out = given_dir(setup)
    for name in ("00000", "00001"):
        a = torch.load(bench / "iterates" / f"{name}.pt")
        b = torch.load(out / "iterates" / f"{name}.pt")
        assert len(a) == len(b) == 3 * 3 and all(torch.equal(u, v) for u, v in zip(a, b)), name
        assert (bench / "recon" / f"{name}.png").read_bytes() == (out / "recon" / f"{name}.png").read_bytes()
        assert torch.equal(torch.load(bench / "measurements" / f"{name}.pt"),
                           torch.load(out / "measurements" / f"{name}.pt"))


@pytest.mark.parametrize("task", ["inpainting_random", "motion_blur"])
def test_a_benchmark_run_folders_measurements_restore_as_they_are(setup, task):
    operator, size = TASKS[task]
    set_task(setup, operator, size)
    assert dcdp.main(args(setup, "--no_curves")) == 0
    bench = run_dir(setup)
    assert dcdp.main(given(setup, bench / "measurements")) == 0
    out = given_dir(setup)
    for name in ("00000", "00001"):
        assert (bench / "recon" / f"{name}.png").read_bytes() == (out / "recon" / f"{name}.png").read_bytes()
    assert json.loads((out / "run_config.json").read_text())["dataset"]["images"] == 2


def test_outputs_without_ground_truth(setup, tmp_path):
    assert dcdp.main(args(setup, "--no_curves")) == 0
    folder = as_measurement_folder(run_dir(setup), tmp_path / "y")
    assert dcdp.main(given(setup, folder)) == 0
    out = given_dir(setup)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert list(rows[0]) == ["index", "file", "status", "reason", "residual_before", "residual", "seconds", "nfe",
                             "dc_steps"]
    y = torch.load(folder / "00000.pt")
    assert 0 < float(rows[0]["residual"]) < 2 and 0 < float(rows[0]["residual_before"]) < 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ground_truth"] is False and summary["metrics"]["residual"]["n"] == 2
    assert "psnr" not in summary["metrics"] and not (out / "label").exists() and not (out / "dc").exists()
    assert Image.open(out / "recon" / "00000.png").size == (y.shape[-1] * 4, y.shape[-2] * 4)
    assert sorted(p.name for p in (out / "input").iterdir()) == ["00000.png", "00001.png"]
    identity = json.loads((out / "run_config.json").read_text())["dataset"]
    assert identity["mode"] == "measurements" and identity["images"] == 2
    # another listing (a file more) is another run: another folder
    shutil.copy(folder / "00000.pt", folder / "00002.pt")
    assert dcdp.main(given(setup, folder, "--max_images", "1")) == 0
    assert len(list((setup["out"].parent / "given").glob("*/*/*/*"))) == 2


def residual(op, x, y):
    return float((op(x) - y).norm() / y.norm())


def test_residual_is_that_of_the_saved_result(setup, tmp_path):
    """The residual column is ‖A(x̂) − y‖/‖y‖ of the restored image (checked on its 8-bit PNG: within 0.01)."""
    from guided_diffusion.measurements import get_operator

    set_task(setup, {"name": "gaussian_blur", "kernel_size": 5, "intensity": 1.0})
    assert dcdp.main(args(setup, "--no_curves")) == 0
    folder = as_measurement_folder(run_dir(setup), tmp_path / "y")
    assert dcdp.main(given(setup, folder)) == 0
    out = given_dir(setup)
    row = next(csv.DictReader(open(out / "metrics.csv")))
    x = torch.from_numpy(np.asarray(Image.open(out / "recon" / "00000.png"), np.float32)).permute(2, 0, 1)[None]
    op = get_operator("gaussian_blur", kernel_size=5, intensity=1.0)
    assert residual(op, x / 127.5 - 1, torch.load(folder / "00000.pt")[None]) == pytest.approx(float(row["residual"]),
                                                                                                abs=0.01)


def png(path: Path, h: int, w: int, mode="RGB", seed=0) -> None:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(path)


def test_any_size_odd_and_non_square(setup, tmp_path, caplog):
    folder = tmp_path / "y"
    folder.mkdir()
    png(folder / "a.png", 9, 7)                 # low resolution 7x9 -> 28x36
    png(folder / "b.png", 5, 11, seed=1)        # -> 44x20
    caplog.set_level("WARNING")
    assert dcdp.main(given(setup, folder, "--batch_size", "2")) == 0
    out = given_dir(setup)
    assert Image.open(out / "recon" / "00000.png").size == (28, 36)
    assert Image.open(out / "recon" / "00001.png").size == (44, 20)
    assert [r["status"] for r in csv.DictReader(open(out / "metrics.csv"))] == ["ok", "ok"]
    set_task(setup, {"name": "noise"})
    png(folder / "c.png", 37, 31, seed=2)
    assert dcdp.main(given(setup, folder)) == 0
    assert Image.open(next(setup["out"].parent.glob("given/noise/*/*/*")) / "recon" / "00002.png").size == (31, 37)


def test_far_sizes_warn_once(setup, tmp_path, caplog):
    set_task(setup, {"name": "noise"})
    folder = tmp_path / "y"
    folder.mkdir()
    png(folder / "a.png", 80, 72)
    png(folder / "b.png", 72, 80)
    caplog.set_level("WARNING")
    assert dcdp.main(given(setup, folder)) == 0
    assert caplog.text.count("far from the prior's training size 32x32") == 1


class ShapeCheckingPrior:
    """Records the shapes it purifies; 'purifies' by adding T_k so the crop can be checked."""

    to_image = None
    size_multiple = 8

    def __init__(self):
        self.shapes = []

    def purify(self, x, T_k, generators):
        self.shapes.append(tuple(x.shape))
        return x + T_k


def test_padded_prior_pads_reflect_and_crops_back():
    inner = ShapeCheckingPrior()
    prior = PaddedPrior(inner, 8)
    x = torch.randn(2, 3, 13, 6)
    out = prior.purify(x, 5, [None, None])
    assert inner.shapes == [(2, 3, 16, 8)] and torch.equal(out, x + 5)
    x = torch.randn(1, 3, 16, 8)
    assert torch.equal(prior.purify(x, 1, [None]), x + 1) and inner.shapes[-1] == (1, 3, 16, 8)


def test_bad_measurements_are_that_images_one_line_failure(setup, tmp_path):
    set_task(setup, {"name": "inpainting", "mask_opt": {"mask_type": "random"}})
    folder = tmp_path / "y"
    folder.mkdir()
    png(folder / "good.png", 32, 32)
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(folder / "good.mask.png")
    png(folder / "small_mask.png", 32, 32)
    Image.fromarray(np.full((16, 24), 255, np.uint8)).save(folder / "small_mask.mask.png")
    png(folder / "grey.png", 32, 32, mode="L")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(folder / "grey.mask.png")
    png(folder / "no_mask.png", 32, 32)
    png(folder / "bool_mask.png", 32, 32)
    np.save(folder / "bool_mask.mask.npy", np.ones((32, 32), bool))
    torch.save({"y": torch.zeros(3, 32, 32)}, folder / "dict.pt")
    assert dcdp.main(given(setup, folder)) == dcdp.EXIT_FAILED_IMAGES
    rows = {Path(r["file"]).stem: r for r in csv.DictReader(open(given_dir(setup) / "metrics.csv"))}
    assert rows["good"]["status"] == "ok"
    assert "mask 'small_mask.mask.png' is 24x16, the measurement is 32x32" in rows["small_mask"]["reason"]
    assert "grey image" in rows["grey"]["reason"] and "convert it to RGB" in rows["grey"]["reason"]
    assert "no mask" in rows["no_mask"]["reason"]
    assert rows["bool_mask"]["status"] == "ok" and "holds dict, not a real tensor" in rows["dict"]["reason"]
    assert all("\n" not in r["reason"] for r in rows.values())


def test_a_folder_mask_replaces_a_yaml_box_that_does_not_fit(setup, tmp_path):
    set_task(setup, {"name": "inpainting", "mask_opt": {"box": [20, 20, 30, 30]}})
    folder = tmp_path / "y"
    folder.mkdir()
    png(folder / "a.png", 24, 16)
    png(folder / "b.png", 24, 16, seed=1)
    mask = np.full((24, 16), 255, np.uint8)
    mask[4:9, 3:12] = 0
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "sub").mkdir()
    png(folder / "sub" / "c.png", 56, 56)  # no mask in its folder: the YAML box (too big for 24x16, fits 56x56)
    assert dcdp.main(given(setup, folder, "--batch_size", "3", "--save_iterates")) == 0
    out = given_dir(setup)
    saved = torch.load(out / "states" / "00000.pt")["mask"]
    assert saved.shape == (1, 3, 24, 16) and torch.equal(saved[0, 0], torch.from_numpy(mask >= 128).float())
    assert torch.load(out / "states" / "00002.pt")["mask"][0, 0, 20:50, 20:50].sum() == 0


def test_kernel_files_normalised_or_refused(setup, tmp_path):
    set_task(setup, {"name": "gaussian_blur", "kernel_size": 5, "intensity": 1.0})
    folder = tmp_path / "y"
    (folder / "sub").mkdir(parents=True)
    png(folder / "a.png", 32, 32)
    png(folder / "b.png", 32, 32, seed=1)
    kernel = np.zeros((3, 5), np.float32)
    kernel[1, 1:4] = 1 / 3
    np.save(folder / "a.kernel.npy", kernel)
    np.save(folder / "b.kernel.npy", kernel * 3)  # sums to 3
    png(folder / "sub" / "c.png", 32, 32, seed=2)
    Image.fromarray((kernel * 600).astype(np.uint8)).save(folder / "sub" / "kernel.png")  # the folder's, divided by its sum
    png(folder / "d.png", 32, 32, seed=3)
    np.save(folder / "d.kernel.npy", np.ones((4, 4), np.float32) / 16)
    assert dcdp.main(given(setup, folder)) == dcdp.EXIT_FAILED_IMAGES
    rows = {Path(r["file"]).stem: r for r in csv.DictReader(open(given_dir(setup) / "metrics.csv"))}
    assert rows["a"]["status"] == rows["c"]["status"] == "ok"
    assert "kernel 'b.kernel.npy' is not normalised (it sums to 3)" in rows["b"]["reason"]
    assert "odd sides" in rows["d"]["reason"]


def test_bad_flags_and_folders_are_one_line_errors(setup, tmp_path, caplog):
    assert dcdp.main(given(setup, tmp_path / "nowhere")) == dcdp.EXIT_BAD_INPUT
    assert "--measurements" in caplog.text and "does not exist" in caplog.text
    (tmp_path / "empty").mkdir()
    assert dcdp.main(given(setup, tmp_path / "empty")) == dcdp.EXIT_BAD_INPUT
    assert "no measurement files" in caplog.text
    assert dcdp.main(given(setup, tmp_path / "empty", "--data_root", str(tmp_path))) == dcdp.EXIT_BAD_INPUT
    assert not (setup["out"].parent / "given").exists()


def test_phase_retrieval_refuses_pictures(setup, tmp_path):
    set_task(setup, {"name": "phase_retrieval", "oversample": 2.0})
    folder = tmp_path / "y"
    folder.mkdir()
    png(folder / "a.png", 48, 48)
    torch.save(torch.rand(3, 47, 47), folder / "b.pt")
    assert dcdp.main(given(setup, folder)) == dcdp.EXIT_FAILED_IMAGES
    rows = list(csv.DictReader(open(given_dir(setup) / "metrics.csv")))
    assert "give the tensor y" in rows[0]["reason"] and "no padded image's size" in rows[1]["reason"]


def cli(p, folder, *extra):
    return [sys.executable, str(ROOT / "dcdp.py"), *given(p, folder, *extra)]


def test_torchrun_and_resume_on_a_measurement_folder(setup, tmp_path):
    folder = tmp_path / "y"
    folder.mkdir()
    for i in range(4):
        png(folder / f"m{i}.png", 8, 8, seed=i)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = dict(setup, out=tmp_path / "single" / "out")
    subprocess.run(cli(single, folder, "--max_images", "2"), check=True, env=env, cwd=ROOT, timeout=300)
    root = next((tmp_path / "single" / "given").glob("*/*/*/*"))
    first = (root / "recon" / "00000.png").stat().st_mtime_ns
    subprocess.run(cli(single, folder, "--resume"), check=True, env=env, cwd=ROOT, timeout=300)
    assert (root / "recon" / "00000.png").stat().st_mtime_ns == first
    assert len(list(csv.DictReader(open(root / "metrics.csv")))) == 4
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                    *cli(setup, folder)[1:]], check=True, env=env, cwd=ROOT, timeout=300)
    dist_root = given_dir(setup)
    for i in range(4):
        name = f"recon/{i:05d}.png"
        assert (root / name).read_bytes() == (dist_root / name).read_bytes(), name
    summary = json.loads((dist_root / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ok"] == 4 and summary["ground_truth"] is False
