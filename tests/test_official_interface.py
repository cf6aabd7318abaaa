"""The official DCDP files and command lines, as they are (upstream-dcdp.md §3.1), and key=value overrides.

The official files are written here verbatim, as text (their `!!python/tuple` tags, integer `sigma: 0`,
missing final newlines, key orders and the ignored `measurement.mask_opt`), then run through the driver
with a tiny random UNet; the overrides only shrink the work (fewer rounds, 32x32 images).
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import dcdp
from guided_diffusion.config import ConfigError, load_purification_config, load_task_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]

# purification_configurations/purification_config_super_resolution.yaml of the official repository
OFFICIAL_PURIFICATION_SR = """purification:
  total_num_iterations: 10
  csgm_num_iterations: 100
  purification_schedule: linear
  save_every_main: 100000
  save_every_sub: 100000
  optimizer: SGD
  lr: 1000
  momentum: 0.9
  ddim_num_iterations: 20
  full_ddim: True
  ddim_init_timestep: 400
  ddim_end_timestep: 0
  use_weight_decay: False
  weight_decay_lambda: 0

dataset:
  name: ffhq
  #img_size: !!python/tuple [1,3,256,256]
  root: ./data/ffhq

others:
  img_size: !!python/tuple [1,3,256,256]"""  # no final newline, as some official files

OFFICIAL_PURIFICATION_INPAINTING = """purification:
  total_num_iterations: 20
  csgm_num_iterations: 50
  lr: 1000
  ddim_init_timestep: 700
  ddim_end_timestep: 0
  purification_schedule: linear
  optimizer: SGD
  momentum: 0.9
  ddim_num_iterations: 20
  full_ddim: True
  use_weight_decay: False
  weight_decay_lambda: 0
  save_every_main: 1000000
  save_every_sub: 10000000
dataset:
  name: ffhq
  root: ./data/ffhq
others:
  img_size: !!python/tuple [1,3,256,256]
"""

OFFICIAL_TASK_SR = """conditioning:
  method: ps
  params:
    scale: 0.3

measurement:
  operator:
    name: super_resolution
    in_shape: !!python/tuple [1, 3, 256, 256]
    scale_factor: 4

  noise:
    name: gaussian
    sigma: 0
"""

OFFICIAL_TASK_INPAINTING = """conditioning:
  method: ps
  params:
    scale: 1

measurement:
  operator:
    name: inpainting
  mask_opt:
    mask_type: random
    # mask_len_range: !!python/tuple [128, 129]  # for box
    mask_prob_range: !!python/tuple [0.3, 0.7]  # for random
    image_size: 256

  noise:
    name: gaussian
    sigma: 0"""

OFFICIAL_TASK_GAUSSIAN = """conditioning:
  method: ps
  params:
    scale: 0.3

measurement:
  operator:
    name: gaussian_blur
    kernel_size: 61
    intensity: 3.0

  noise:
    name: gaussian
    sigma: 0
"""

OFFICIAL_TASK_PHASE = """conditioning:
  method: ps
  params:
    scale: 1

measurement:
  operator:
    name: phase_retrieval
    oversample: 2.0

  noise:
    name: gaussian
    sigma: 0.05
"""

# DCDP-LDM/configs/tasks/super_resolution_config.yaml (conditioning.main_sampler, a data block)
OFFICIAL_LDM_TASK_SR = """conditioning:
  method: ps
  main_sampler: resample
  params:
    scale: 0.3

data:
  name: celeb
  root: ./data/samples/

measurement:
  operator:
    name: super_resolution
    in_shape: !!python/tuple [1, 3, 256, 256]
    scale_factor: 4

  noise:
    name: gaussian
    sigma: 0.0
"""

TINY_UNET = {
    "image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", "learn_sigma": True,
    "class_cond": False, "use_checkpoint": False, "attention_resolutions": "16", "num_heads": 4,
    "num_head_channels": 16, "num_heads_upsample": -1, "use_scale_shift_norm": True, "dropout": 0.0,
    "resblock_updown": True, "use_fp16": False, "use_new_attention_order": False, "model_path": None,
}
SMALL = ["purification.total_num_iterations=2", "purification.csgm_num_iterations=3",
         "purification.ddim_num_iterations=2", "others.img_size=[1,3,32,32]"]


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(data / f"{i:05d}.png")
    paths = {"data": data, "out": tmp_path / "out", "model": tmp_path / "model.yaml"}
    paths["model"].write_text(yaml.safe_dump(TINY_UNET))
    for name, text in (("pur_sr", OFFICIAL_PURIFICATION_SR), ("pur_inp", OFFICIAL_PURIFICATION_INPAINTING),
                       ("task_sr", OFFICIAL_TASK_SR), ("task_inp", OFFICIAL_TASK_INPAINTING),
                       ("task_gd", OFFICIAL_TASK_GAUSSIAN), ("task_pr", OFFICIAL_TASK_PHASE),
                       ("task_ldm_sr", OFFICIAL_LDM_TASK_SR)):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(text)
    return paths


def driver(p, task, pur, *extra):
    return ["--task_config", str(p[task]), "--purification_config", str(p[pur]), "--model_config", str(p["model"]),
            "--save_dir", str(p["out"]), "--device", "cpu", "--quiet", "--no_curves", "--data_root", str(p["data"]),
            *extra]


def summaries(out: Path) -> list[dict]:
    return [json.loads(s.read_text()) for s in sorted(out.glob("*/*/*/*/summary.json"))]


def test_official_purification_file_loads_with_official_values(files):
    cfg = load_purification_config(files["pur_sr"])
    s = cfg.settings()
    assert (s.K, s.tau, s.lr, s.T_init, s.T_end, s.schedule, s.optimizer, s.momentum) == \
        (10, 100, 1000.0, 400, 0, "linear", "SGD", 0.9)
    assert cfg.full_ddim is True and cfg.ddim_num_iterations == 20 and cfg.image_size == 256
    assert (cfg.dataset_name, cfg.dataset_root) == ("ffhq", "./data/ffhq")


@pytest.mark.parametrize("shipped", sorted((ROOT / "purification_configurations").rglob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_purification_file_has_the_official_layout(shipped):
    raw = yaml.safe_load(shipped.read_text())
    assert isinstance(raw.get("purification"), dict), f"{shipped.name}: no purification: block"
    assert set(raw) <= {"purification", "dataset", "others"}
    assert set(raw.get("others") or {}) <= {"img_size"}
    load_purification_config(shipped)  # and it loads


def test_shipped_and_official_super_resolution_files_agree(files):
    ours = load_purification_config(ROOT / "purification_configurations/purification_config_super_resolution.yaml")
    official = load_purification_config(files["pur_sr"])
    assert ours.resolved() == official.resolved()


@pytest.mark.parametrize("task,pur", [("task_sr", "pur_sr"), ("task_gd", "pur_sr"), ("task_pr", "pur_sr"),
                                      ("task_inp", "pur_inp")])
def test_official_files_run_through_the_driver(files, task, pur):
    assert dcdp.main(driver(files, task, pur, *SMALL)) == 0
    (summary,) = summaries(files["out"])
    assert summary["ok"] == 2 and summary["failed"] == 0


def test_official_inpainting_mask_opt_is_ignored_and_the_official_box_cut(files, caplog):
    caplog.set_level("INFO")
    task = load_task_config(files["task_inp"])
    assert task.operator["mask_opt"] == {"mask_type": "box"}  # the official hole, rows/cols 100..199 at 256
    assert dcdp.main(driver(files, "task_inp", "pur_inp", *SMALL, "--max_images", "1")) == 0
    assert "measurement.mask_opt is ignored" in caplog.text and "mask_opt under measurement.operator" in caplog.text
    (root,) = files["out"].glob("*/*/*/*")
    import torch

    mask = torch.load(root / "states" / "00000.pt")["mask"] if (root / "states" / "00000.pt").exists() else None
    y = torch.load(root / "measurements" / "00000.pt")
    hole = slice(round(100 * 32 / 256), round(200 * 32 / 256))
    assert (y[:, hole, hole] == 0).all() and (y[:, :hole.start, :] != 0).any()
    assert mask is None or mask[..., hole, hole].sum() == 0


def test_ldm_task_file_data_block_and_main_sampler(files, caplog):
    caplog.set_level("INFO")
    task = load_task_config(files["task_ldm_sr"])
    assert task.data == {"name": "celeb", "root": "./data/samples/"} and task.ignored == ["conditioning"]
    # no purification file: the official DCDP-LDM defaults; the dataset comes from the task's data block
    args = dcdp.parse_args(["--task_config", str(files["task_ldm_sr"]), "--model_config", str(files["model"])])
    _, pur, _ = dcdp.load_configs(args)
    assert (pur.dataset_name, pur.dataset_root) == ("celeb", "./data/samples/")


def test_override_parity_with_an_official_file(files, tmp_path):
    """The official file with its values changed by overrides == a file with those values written in."""
    changed = OFFICIAL_PURIFICATION_SR.replace("lr: 1000", "lr: 3000").replace("total_num_iterations: 10",
                                                                               "total_num_iterations: 2")
    changed = changed.replace("csgm_num_iterations: 100", "csgm_num_iterations: 3").replace(
        "ddim_num_iterations: 20", "ddim_num_iterations: 2").replace("img_size: !!python/tuple [1,3,256,256]\"", "")
    changed = changed.replace("others:\n  img_size: !!python/tuple [1,3,256,256]", "others:\n  img_size: [1, 3, 32, 32]")
    files["pur_changed"] = tmp_path / "changed.yaml"
    files["pur_changed"].write_text(changed)
    assert dcdp.main(driver(files, "task_sr", "pur_changed")) == 0
    assert dcdp.main(driver(files, "task_sr", "pur_sr", *SMALL, "purification.lr=3e3", "--resume")) == 0
    (summary,) = summaries(files["out"])  # one folder: the same resolved configuration
    assert summary["ok"] == 2
    assert dcdp.main(driver(files, "task_sr", "pur_sr", *SMALL, "purification.lr=3e3")) == 0
    (again,) = summaries(files["out"])
    assert again["metrics"]["psnr"]["mean"] == summary["metrics"]["psnr"]["mean"]


def test_overrides_change_the_run_folder(files):
    assert dcdp.main(driver(files, "task_sr", "pur_sr", *SMALL, "--max_images", "1")) == 0
    assert dcdp.main(driver(files, "task_sr", "pur_sr", *SMALL, "--max_images", "1", "measurement.noise.sigma=0.05")) == 0
    assert dcdp.main(driver(files, "task_sr", "pur_sr", *SMALL, "--max_images", "1", "purification.momentum=0.5")) == 0
    assert len(summaries(files["out"])) == 3
    sigmas = sorted(s["resolved"]["task"]["noise"]["sigma"] for s in summaries(files["out"]))
    assert sigmas == [0.0, 0.0, 0.05]


def test_override_values_are_yaml_scalars_and_flow_lists():
    o = {x.text: x for x in parse_overrides(["purification.lr=1e4", "others.img_size=[1,3,64,64]",
                                             "purification.full_ddim=false", "model.model_path=/ckpt/ffhq_10m.pt",
                                             "measurement.noise.sigma=0.05"])}
    assert o["purification.lr=1e4"].value == 1e4
    assert o["others.img_size=[1,3,64,64]"].value == [1, 3, 64, 64]
    assert o["purification.full_ddim=false"].value is False
    assert o["model.model_path=/ckpt/ffhq_10m.pt"].file == "model" and o["model.model_path=/ckpt/ffhq_10m.pt"].path == ("model_path",)
    assert o["measurement.noise.sigma=0.05"].file == "task"


@pytest.mark.parametrize("override,words", [
    ("purification.lr=abc", ["purification.lr=abc", "'abc'", "a number > 0"]),
    ("purification.learning_rate=1", ["learning_rate", "valid keys", "total_num_iterations"]),
    ("purification.total_num_iterations=0", ["total_num_iterations = 0", "an integer >= 1"]),
    ("purification.csgm_num_iterations=-1", ["csgm_num_iterations = -1", ">= 1"]),
    ("purification.ddim_init_timestep=1001", ["ddim_init_timestep = 1001", "<= 1000"]),
    ("purification.ddim_init_timestep=0", ["ddim_init_timestep = 0", ">= 1"]),
    ("purification.purification_schedule=exponential", ["exponential", "linear, constant, cosine"]),
    ("purification.full_ddim='false'", ["full_ddim = 'false'", "true or false"]),
    ("purification.average_last_rounds=0", ["average_last_rounds = 0", ">= 1"]),
    ("purification.average_last_rounds=3", ["average_last_rounds = 3", "more than the 2 rounds", "from 1"]),
    ("purification.purification_transforms=rotate", ["rotate", "none, flip, dihedral"]),
    ("measurement.noise.sigma=-0.1", ["sigma = -0.1", ">= 0"]),
    ("measurement.noise.sigmaa=0.1", ["sigmaa", "valid keys"]),
    ("foo.bar=1", ["foo", "valid: purification"]),
    ("purification.lr", ["purification.lr", "key=value"]),
])
def test_bad_overrides_are_one_line_errors(files, capsys, caplog, override, words):
    code = dcdp.main(driver(files, "task_sr", "pur_sr", *SMALL, override))
    assert code == dcdp.EXIT_BAD_INPUT
    text = caplog.text + capsys.readouterr().err
    line = [ln for ln in text.splitlines() if "error" in ln][-1]
    for w in words:
        assert w in line, (w, line)
    assert not files["out"].exists()


# ---------------------------------------------------------------------------------------------
# The official DCDP-LDM command lines
# ---------------------------------------------------------------------------------------------

# run_latent_sapce_dcdp.sh / the DCDP-LDM README, with our task file paths
LDM_COMMANDS = {
    "gaussian_deblur": "--full_ddim=True --total_num_iterations=4 --csgm_num_iterations=250 --ddim_init_timestep=400 "
                       "--ddim_end_timestep=0 --save_every_main=1 --save_every_sub=100000 --optimizer=SGD --lr=100000 "
                       "--data_consistency_type=pixel --verbose=True --momentum=0.9",
    "super_resolution": "--full_ddim=True --total_num_iterations=10 --csgm_num_iterations=100 --ddim_init_timestep=400 "
                        "--ddim_end_timestep=0 --save_every_main=1 --save_every_sub=100000 --optimizer=SGD --lr=1000 "
                        "--data_consistency_type=latent --verbose=True --momentum=0.9",
    "inpainting": "--full_ddim=True --total_num_iterations=20 --csgm_num_iterations=50 --ddim_init_timestep=500 "
                  "--ddim_end_timestep=0 --save_every_main=1 --save_every_sub=100000 --optimizer=SGD --lr=1000 "
                  "--data_consistency_type=latent --verbose=True --momentum=0.9",
    "motion_deblur": "--full_ddim True --total_num_iterations 10 --csgm_num_iterations 100 --ddim_init_timestep 400 "
                     "--ddim_end_timestep 0 --optimizer SGD --lr 100000 --data_consistency_type pixel --momentum 0.9",
    "nonlinear_deblur": "--full_ddim=True --total_num_iterations=10 --csgm_num_iterations=100 --ddim_init_timestep=1000 "
                        "--ddim_end_timestep=50 --optimizer=SGD --lr=5000 --data_consistency_type=latent --momentum=0.9",
}
LDM_TASKS = {"gaussian_deblur": "gaussian_deblur_config.yaml", "super_resolution": "super_resolution_config.yaml",
             "inpainting": "inpainting_config.yaml", "motion_deblur": "motion_deblur_config.yaml",
             "nonlinear_deblur": "nonlinear_deblur_config.yaml"}


@pytest.mark.parametrize("task", sorted(LDM_COMMANDS))
def test_ldm_command_lines_give_the_shipped_ldm_settings(task):
    argv = LDM_COMMANDS[task].split() + [f"--task_config=task_configurations/{LDM_TASKS[task]}"]
    args = dcdp.parse_args(argv)
    assert args.ldm_driver and args.model_config.endswith("model_config_ldm_ffhq.yaml")
    _, pur, model = dcdp.load_configs(args)
    shipped = load_purification_config(ROOT / f"purification_configurations/purification_config_ldm_{task}.yaml")
    keys = ("total_num_iterations", "csgm_num_iterations", "ddim_init_timestep", "ddim_end_timestep", "lr",
            "momentum", "optimizer", "full_ddim", "ddim_num_iterations", "purification_schedule", "data_consistency_type")
    assert {k: pur.values[k] for k in keys} == {k: shipped.values[k] for k in keys}
    assert model["kind"] == "latent"


def test_ldm_flags_select_the_imagenet_model_and_checkpoint(tmp_path):
    args = dcdp.parse_args(["--task_config", "task_configurations/super_resolution_config.yaml",
                            "--ldm_config", "configs/latent-diffusion/cin256-v2.yaml",
                            "--diffusion_config", "models/ldm_imagenet/model.ckpt"])
    assert args.model_config.endswith("model_config_ldm_imagenet.yaml")
    assert args.save_dir == "./purification_results_imagenet"
    _, pur, model = dcdp.load_configs(args)
    assert model["model_path"] == "models/ldm_imagenet/model.ckpt"
    assert pur.full_ddim is False and pur.settings().K == 10  # the official LDM defaults


@pytest.mark.parametrize("argv,words", [
    (["--full_ddim=yes"], ["--full_ddim", "True or False"]),
    (["--ddim_eta=0.5"], ["ddim_eta", "0.5"]),
    (["--lr=abc"], ["--lr", "'abc'"]),
    (["--z_dim=(1,4,32,32)"], ["--z_dim", "(1,3,64,64)"]),
    (["--ldm_config=foo.yaml"], ["--ldm_config", "cin256-v2.yaml"]),
])
def test_bad_ldm_flags_are_one_line_errors(argv, words, capsys, caplog):
    code = None
    try:
        code = dcdp.main(["--task_config", "task_configurations/super_resolution_config.yaml", *argv])
    except SystemExit as exc:
        code = exc.code
    assert code == dcdp.EXIT_BAD_INPUT
    text = caplog.text + capsys.readouterr().err
    line = [ln for ln in text.splitlines() if "error" in ln][-1]
    for w in words:
        assert w in line, (w, line)


def test_ldm_flags_override_a_purification_file(files):
    args = dcdp.parse_args(driver(files, "task_sr", "pur_sr", "--lr=5", "--full_ddim=False"))
    _, pur, _ = dcdp.load_configs(args)
    assert pur.values["lr"] == 5.0 and pur.full_ddim is False and pur.settings().K == 10


def test_ldm_command_runs_end_to_end_with_a_tiny_latent_model(files, tmp_path):
    from tests.test_latent import TINY

    model = tmp_path / "tiny_ldm.yaml"
    model.write_text(yaml.safe_dump(TINY))
    argv = ["--full_ddim=False", "--total_num_iterations=2", "--csgm_num_iterations=2", "--ddim_init_timestep=400",
            "--ddim_end_timestep=0", "--optimizer=SGD", "--lr=1000", "--data_consistency_type=pixel", "--verbose=True",
            f"--task_config={files['task_sr']}", f"--model_config={model}", f"--save_dir={files['out']}",
            f"--data_root={files['data']}", "--device=cpu", "--quiet", "--no_curves", "--max_images=1",
            "others.img_size=[1,3,32,32]"]
    assert dcdp.main(argv) == 0
    (summary,) = summaries(files["out"])
    assert summary["ok"] == 1 and summary["resolved"]["purification"]["purification"]["total_num_iterations"] == 2
    rows = list(csv.DictReader(open(Path(summary["run_dir"]) / "metrics.csv")))
    assert rows[0]["nfe"] == "2"
