"""End-to-end runs of dcdp.py with a tiny random UNet on small images, and its bad-input handling."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dcdp
from tests.test_demo_numbers import demo_threads  # noqa: F401  (a fixture)

TINY_UNET = {
    "image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", "learn_sigma": True,
    "class_cond": False, "use_checkpoint": False, "attention_resolutions": "16", "num_heads": 4,
    "num_head_channels": 16, "num_heads_upsample": -1, "use_scale_shift_norm": True, "dropout": 0.0,
    "resblock_updown": True, "use_fp16": False, "use_new_attention_order": False, "model_path": None,
}


def write_images(folder: Path, n: int, size: int = 32) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


@pytest.fixture
def setup(tmp_path):
    data = tmp_path / "data"
    write_images(data, 2)
    task = {"measurement": {"operator": {"name": "super_resolution", "in_shape": [1, 3, 32, 32], "scale_factor": 4},
                            "noise": {"name": "gaussian", "sigma": 0.05}},
            "conditioning": {"method": "ps", "params": {"scale": 0.3}}}
    pur = {"total_num_iterations": 3, "csgm_num_iterations": 5, "lr": 1000, "ddim_init_timestep": 100,
           "ddim_end_timestep": 0, "purification_schedule": "linear", "optimizer": "SGD", "momentum": 0.9,
           "ddim_num_iterations": 4, "full_ddim": True, "use_weight_decay": False, "weight_decay_lambda": 0,
           "save_every_main": 1000, "save_every_sub": 1000, "dataset": {"name": "ffhq", "root": str(data)},
           "others": {"img_size": [1, 3, 32, 32]}}
    paths = {}
    for name, content in (("task", task), ("pur", pur), ("model", TINY_UNET)):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(content))
    paths["out"] = tmp_path / "out"
    paths["data"] = data
    return paths


def args(p, *extra):
    return ["--task_config", str(p["task"]), "--purification_config", str(p["pur"]), "--model_config", str(p["model"]),
            "--save_dir", str(p["out"]), "--device", "cpu", "--quiet", *extra]


def run_dir(p) -> Path:
    return next(p["out"].glob("*/*/*/*"))


def test_end_to_end_writes_all_outputs(setup):
    assert dcdp.main(args(setup, "--save_iterates")) == 0
    root = run_dir(setup)
    for sub in ("input", "recon", "label"):
        assert sorted(f.name for f in (root / sub).iterdir()) == ["00000.png", "00001.png"]
    assert (root / "measurements" / "00000.pt").is_file()
    assert (root / "iterates" / "00001.pt").is_file()
    assert (root / "figures" / "00000_metrics.png").is_file()
    rows = list(csv.DictReader(open(root / "metrics.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert float(rows[0]["psnr"]) > 0 and int(rows[0]["nfe"]) == 4 + 4 + 2
    summary = json.loads((root / "summary.json").read_text())
    assert summary["ok"] == 2 and summary["metrics"]["psnr"]["n"] == 2
    assert "torch" in summary["versions"]
    assert not list(root.rglob("*.tmp*"))


def test_batch_size_does_not_change_results(setup):
    assert dcdp.main(args(setup, "--no_curves")) == 0
    one = (run_dir(setup) / "recon" / "00001.png").read_bytes()
    setup["out"] = setup["out"].parent / "out_b2"
    assert dcdp.main(args(setup, "--no_curves", "--batch_size", "2")) == 0
    a = np.asarray(Image.open(run_dir(setup) / "recon" / "00001.png"), dtype=int)
    b = np.asarray(Image.open(__import__("io").BytesIO(one)), dtype=int)
    assert np.abs(a - b).max() <= 1


def test_resume_skips_complete_and_other_settings_get_their_own_folder(setup, caplog):
    assert dcdp.main(args(setup, "--no_curves", "--max_images", "1")) == 0
    root = run_dir(setup)
    first = (root / "recon" / "00000.png").stat().st_mtime_ns
    assert dcdp.main(args(setup, "--no_curves", "--resume")) == 0
    assert (root / "recon" / "00000.png").stat().st_mtime_ns == first
    assert (root / "recon" / "00001.png").is_file()
    # another seed or network precision gives other numbers: another folder (the identity hash differs)
    assert dcdp.main(args(setup, "--no_curves", "--resume", "--seed", "5")) == 0
    assert dcdp.main(args(setup, "--no_curves", "--resume", "--precision", "bf16")) == 0
    folders = sorted(setup["out"].glob("*/*/*/*"))
    assert len(folders) == 3
    seeds = sorted(json.loads((f / "run_config.json").read_text())["seed"] for f in folders)
    assert seeds == [0, 0, 5]


def test_a_folder_of_other_settings_is_refused(setup, caplog):
    assert dcdp.main(args(setup, "--no_curves", "--max_images", "1")) == 0
    root = run_dir(setup)
    record = json.loads((root / "run_config.json").read_text())
    record["seed"] = 99  # as if another configuration had made this folder
    (root / "run_config.json").write_text(json.dumps(record))
    assert dcdp.main(args(setup, "--no_curves", "--resume")) == dcdp.EXIT_BAD_INPUT
    assert "other settings (seed)" in caplog.text and str(root) in caplog.text
    assert json.loads((root / "run_config.json").read_text())["seed"] == 99  # not replaced


def test_corrupt_image_is_reported_and_skipped(setup):
    (setup["data"] / "img9.png").write_bytes(b"not a png")
    assert dcdp.main(args(setup, "--no_curves")) == dcdp.EXIT_FAILED_IMAGES
    rows = {r["file"].split("/")[-1]: r for r in csv.DictReader(open(run_dir(setup) / "metrics.csv"))}
    assert rows["img9.png"]["status"] == "failed" and "img9.png" in rows["img9.png"]["reason"]
    assert rows["img0.png"]["status"] == "ok"


def test_divergence_is_reported(setup):
    pur = yaml.safe_load(setup["pur"].read_text())
    pur["lr"] = 1e30
    setup["pur"].write_text(yaml.safe_dump(pur))
    assert dcdp.main(args(setup, "--no_curves", "--max_images", "1")) == dcdp.EXIT_FAILED_IMAGES
    row = next(csv.DictReader(open(run_dir(setup) / "metrics.csv")))
    assert row["status"] == "failed" and "outer iteration 0" in row["reason"]


@pytest.mark.parametrize("which,key", [("pur", "learning_rate"), ("task", "measurment"), ("model", "num_chanels")])
def test_unknown_yaml_key_fails_with_valid_list(setup, caplog, which, key):
    d = yaml.safe_load(setup[which].read_text())
    d[key] = 1
    setup[which].write_text(yaml.safe_dump(d))
    assert dcdp.main(args(setup)) == dcdp.EXIT_BAD_INPUT
    assert key in caplog.text and "valid" in caplog.text


def test_missing_checkpoint_fails_before_work(setup, caplog):
    m = yaml.safe_load(setup["model"].read_text())
    m["model_path"] = "models/does_not_exist.pt"
    setup["model"].write_text(yaml.safe_dump(m))
    assert dcdp.main(args(setup)) == dcdp.EXIT_BAD_INPUT
    assert "does_not_exist.pt" in caplog.text
    assert not setup["out"].exists()


def test_official_yaml_with_python_tuple_loads(tmp_path):
    from guided_diffusion.config import load_purification_config

    p = tmp_path / "official.yaml"
    p.write_text("total_num_iterations: 10\ncsgm_num_iterations: 100\nlr: 1000\nddim_init_timestep: 400\n"
                 "ddim_end_timestep: 0\ndataset:\n  name: ffhq\n  root: ./data/ffhq\n"
                 "others:\n  img_size: !!python/tuple [1,3,256,256]\n")
    cfg = load_purification_config(p)
    assert cfg.image_size == 256 and cfg.settings().timesteps()[0] == 400


@pytest.mark.parametrize("kind,dc_type", [("latent", "pixel"), ("latent", "latent"), ("consistency", None)])
def test_end_to_end_latent_and_consistency_priors(setup, kind, dc_type):
    from tests.test_consistency import TINY as TINY_CM
    from tests.test_latent import TINY as TINY_LDM

    setup["model"].write_text(yaml.safe_dump(TINY_LDM if kind == "latent" else TINY_CM))
    pur = yaml.safe_load(setup["pur"].read_text())
    if dc_type:
        pur["data_consistency_type"] = dc_type
    else:
        pur["cm_multistep"] = 1
    setup["pur"].write_text(yaml.safe_dump(pur))
    assert dcdp.main(args(setup)) == 0
    root = run_dir(setup)
    assert sorted(f.name for f in (root / "recon").iterdir()) == ["00000.png", "00001.png"]
    rows = list(csv.DictReader(open(root / "metrics.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"] and float(rows[1]["psnr"]) > 0
    assert int(rows[0]["nfe"]) > 0 and (root / "figures" / "00001_metrics.png").is_file()


def test_end_to_end_nonlinear_deblur_with_reduced_random_network(setup):
    """One 256x256 image through the KernelWizard operator (reduced, random weights)."""
    import torch

    for f in setup["data"].iterdir():
        f.unlink()
    write_images(setup["data"], 1, size=256)
    task = {"measurement": {"operator": {"name": "nonlinear_blur",
                                         "opt_yml_path": "./bkse/options/generate_blur/random_small.yml"},
                            "noise": {"name": "gaussian", "sigma": 0.05}}}
    setup["task"].write_text(yaml.safe_dump(task))
    pur = yaml.safe_load(setup["pur"].read_text())
    pur["others"] = {"img_size": [1, 3, 256, 256]}
    pur["total_num_iterations"], pur["csgm_num_iterations"], pur["lr"] = 2, 3, 300
    setup["pur"].write_text(yaml.safe_dump(pur))
    assert dcdp.main(args(setup)) == 0
    root = run_dir(setup)
    for sub in ("input", "recon", "label"):
        assert (root / sub / "00000.png").is_file()
    kernel = torch.load(root / "states" / "00000.pt")["kernel"]
    assert kernel.shape == (1, 128, 2, 2)  # 8·nf channels for the reduced nf = 16 network
    g = torch.Generator().manual_seed(0)  # image 0, seed 0: the kernel is 1.2·N(0, I) from the image's generator
    torch.testing.assert_close(kernel, 1.2 * torch.randn(1, 128, 2, 2, generator=g))


def test_default_command_runs_the_demo(tmp_path, capsys, demo_threads):
    """`python dcdp.py` with no configuration: the super-resolution demo with the shipped demo prior on both
    held-out images, whose mean PSNR / SSIM are the README's (tests/test_demo_numbers.py, EXPECTED)."""
    from tests.test_demo_numbers import EXPECTED, PSNR_TOL, SSIM_TOL

    assert dcdp.main(["--save_dir", str(tmp_path), "--no_curves", "--quiet", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "outputs:" in printed and "mean PSNR" in printed
    summaries = list(tmp_path.rglob("summary.json"))  # the run folder's name is the driver's business
    assert len(summaries) == 1
    root = summaries[0].parent
    rows = list(csv.DictReader(open(root / "metrics.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    summary = json.loads((root / "summary.json").read_text())
    psnr_expected, ssim_expected = EXPECTED["super_resolution"]  # a trained prior, not random weights
    assert abs(summary["metrics"]["psnr"]["mean"] - psnr_expected) <= PSNR_TOL
    assert abs(summary["metrics"]["ssim"]["mean"] - ssim_expected) <= SSIM_TOL
    assert len(summary["checkpoint_sha256"]) == 64


def test_fast_flag_gives_the_reference_results(setup):
    assert dcdp.main(args(setup, "--no_curves")) == 0
    ref = [np.asarray(Image.open(p), dtype=int) for p in sorted((run_dir(setup) / "recon").iterdir())]
    setup["out"] = setup["out"].parent / "out_fast"
    assert dcdp.main(args(setup, "--fast", "--batch_size", "2")) == 0
    fast = [np.asarray(Image.open(p), dtype=int) for p in sorted((run_dir(setup) / "recon").iterdir())]
    assert len(fast) == 2 and all(np.abs(a - b).max() <= 2 for a, b in zip(ref, fast))


def test_fast_sets_the_fast_options_and_batches_of_8_unless_given():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    args = dcdp.parse_args(["--fast"])
    dcdp.apply_fast(args, cpu)
    assert args.batch_size == 8 and args.exact_transpose and args.channels_last and args.no_curves
    assert not args.cuda_graphs and args.precision == "auto"  # CUDA-only options stay off on the CPU
    args = dcdp.parse_args(["--fast", "--batch_size", "3"])
    dcdp.apply_fast(args, cuda)
    assert args.batch_size == 3 and args.cuda_graphs and args.compile and args.precision == "bf16"
    args = dcdp.parse_args(["--fast", "--precision", "fp16"])
    dcdp.apply_fast(args, cuda)
    assert args.precision == "fp16"
    assert dcdp.parse_args([]).batch_size is None  # 1 at run time


def test_a_failing_torch_compile_is_one_clear_error(setup, monkeypatch, caplog):
    """A broken compiler toolchain (simulated: a torch.compile backend that raises) ends the run with one
    line that says which flags to drop, not a compiler traceback."""
    real_compile = torch.compile

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no working compiler here")

    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real_compile(model, backend=broken_backend))
    assert dcdp.main(args(setup, "--compile", "--max_images", "1")) == dcdp.EXIT_BAD_INPUT
    assert "the network compiled by torch.compile failed" in caplog.text
    assert "no working compiler here" in caplog.text and "--compile" in caplog.text
