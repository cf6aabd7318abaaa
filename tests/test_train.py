"""Training of the demo prior: crops, the ε-loss going down, exact resume, strict export, the CLI."""
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from guided_diffusion.gaussian_diffusion import q_sample
from guided_diffusion.train import (
    TrainConfig, diffusion_loss, ema_decay_at, load_model_config, load_train_config, lr_at, main, train,
)
from guided_diffusion.training_data import (
    HELD_OUT, SKIMAGE_TRAINING_IMAGES, RandomCrops, load_folder, load_skimage_images, to_rgb_uint8,
)
from guided_diffusion.unet import create_model
from tests.conftest import ROOT

TINY_MODEL = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=False, class_cond=False,
    use_checkpoint=False, attention_resolutions="8", num_heads=4, num_head_channels=32, num_heads_upsample=-1,
    use_scale_shift_norm=True, dropout=0.0, resblock_updown=True, use_fp16=False, use_new_attention_order=False,
)


def smooth_images(n: int = 3, size: tuple[int, int] = (40, 48), seed: int = 0) -> list[np.ndarray]:
    """Learnable synthetic photos: colour sinusoids with random frequencies and phases, uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[0], : size[1]] / 16.0
    images = []
    for _ in range(n):
        f = rng.uniform(0.5, 2.0, (3, 2))
        p = rng.uniform(0, 2 * np.pi, 3)
        chans = [np.sin(f[c, 0] * yy + f[c, 1] * xx + p[c]) for c in range(3)]
        images.append(np.round((np.stack(chans, -1) + 1) * 127.5).astype(np.uint8))
    return images


def tiny_setup(tmp_path, **overrides):
    cfg = TrainConfig(model_config="", data=str(tmp_path / "images"), crop_size=16, scale_range=(0.5, 1.0),
                      batch_size=8, lr=1e-3, warmup_steps=5, max_steps=40, seed=3, threads=torch.get_num_threads(),
                      out_dir=str(tmp_path / "run"))
    cfg = dataclasses.replace(cfg, **overrides)
    model_cfg = {**TINY_MODEL, "model_path": str(tmp_path / "prior.pt")}
    (tmp_path / "images").mkdir(exist_ok=True)
    for i, a in enumerate(smooth_images()):
        Image.fromarray(a).save(tmp_path / "images" / f"{i}.png")
    return cfg, model_cfg


# ------------------------------------------------------------------------------------------
# Training data
# ------------------------------------------------------------------------------------------

def test_crops_shape_range_and_seeded():
    data = RandomCrops(smooth_images(), crop_size=16, scale_range=(0.5, 1.0))
    a = data.sample(5, torch.Generator().manual_seed(0))
    b = data.sample(5, torch.Generator().manual_seed(0))
    c = data.sample(5, torch.Generator().manual_seed(1))
    assert a.shape == (5, 3, 16, 16) and a.dtype == torch.float32
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unit_scale_crop_is_the_image_up_to_a_flip_and_rotation():
    image = np.random.default_rng(1).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    data = RandomCrops([image], crop_size=12, scale_range=(1.0, 1.0))
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, 12, 12)
    dihedral = [torch.rot90(v, k, dims=(1, 2)) for v in (x, x.flip(2)) for k in range(4)]
    dihedral += [v.flip(2) for v in dihedral]
    seen = set()
    g = torch.Generator().manual_seed(0)
    for crop in data.sample(32, g):
        matches = [i for i, v in enumerate(dihedral) if torch.allclose(crop, v, atol=1e-6)]
        assert matches, "a unit-scale full-size crop must be an exact flip/rotation of the image"
        seen.add(min(matches) % 8)
    assert len(seen) > 4  # the augmentation actually varies


def test_zoomed_out_crop_resamples_a_larger_region():
    image = np.zeros((64, 64), np.uint8)
    image[:, ::2] = 255  # 1-pixel stripes average out to mid-grey when shrunk 4x
    crop = RandomCrops([image], crop_size=16, scale_range=(0.25, 0.25)).sample(1, torch.Generator().manual_seed(0))
    assert crop.abs().max() < 0.2


def test_greyscale_replicated_and_grey_weight():
    grey = np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8)
    colour = smooth_images(1, (20, 20))[0]
    assert to_rgb_uint8(grey).shape == (20, 20, 3) and (to_rgb_uint8(grey)[..., 0] == grey).all()
    g = torch.Generator().manual_seed(0)
    only_colour = RandomCrops([grey, colour], 8, grey_weight=0.0).sample(16, g)
    assert all(not torch.equal(c[0], c[1]) for c in only_colour)
    both = RandomCrops([grey, colour], 8, grey_weight=1.0).sample(32, g)
    assert any(torch.equal(c[0], c[1]) and torch.equal(c[1], c[2]) for c in both)
    with pytest.raises(ValueError, match="weight 0"):
        RandomCrops([grey], 8, grey_weight=0.0)


def test_folder_loading_converts_modes(tmp_path):
    Image.fromarray(np.full((10, 12), 7, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((10, 12, 4), 9, np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_folder(tmp_path)
    assert [im.shape for im in images] == [(10, 12, 3), (10, 12, 3)]
    assert images[0].max() == 7 and images[1].max() == 9
    with pytest.raises(FileNotFoundError):
        load_folder(tmp_path / "missing")


def test_images_smaller_than_the_crop_are_rejected():
    with pytest.raises(ValueError, match="smaller than crop_size"):
        RandomCrops(smooth_images(1, (10, 30)), crop_size=16)


def test_evaluation_images_are_not_training_images():
    import skimage.data

    names = [im.name for im in SKIMAGE_TRAINING_IMAGES]
    assert not set(HELD_OUT) & set(names)
    with pytest.raises(ValueError, match="held out"):
        load_skimage_images(["astronaut"])
    held_out = [to_rgb_uint8(getattr(skimage.data, n)()) for n in HELD_OUT]
    for train_image in load_skimage_images():
        assert not any(train_image.shape == h.shape and (train_image == h).all() for h in held_out)


# ------------------------------------------------------------------------------------------
# Configs and schedules
# ------------------------------------------------------------------------------------------

def test_shipped_configs_load_and_match_the_brief():
    cfg = load_train_config(ROOT / "training_configurations" / "demo.yaml")
    model_cfg = load_model_config(cfg.model_config)
    assert model_cfg["model_path"] == "models/demo_prior.pt" and model_cfg["learn_sigma"] is False
    n_params = sum(p.numel() for p in create_model(**{**model_cfg, "model_path": None}).parameters())
    assert 3e6 <= n_params <= 6e6 and 4 * n_params <= 25e6  # float32 export under 25 MB


def test_unknown_config_keys_fail(tmp_path):
    (tmp_path / "t.yaml").write_text("model_config: x.yaml\nlearning_rate: 1.0\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_train_config(tmp_path / "t.yaml")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({**TINY_MODEL, "model_path": "p.pt", "typo": 1}))
    with pytest.raises(ValueError, match="typo"):
        load_model_config(tmp_path / "m.yaml")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({**TINY_MODEL, "learn_sigma": True, "model_path": "p.pt"}))
    with pytest.raises(ValueError, match="learn_sigma"):
        load_model_config(tmp_path / "m.yaml")


def test_lr_warmup_and_ema_warmup():
    cfg = TrainConfig(model_config="", lr=2e-4, warmup_steps=100)
    assert lr_at(0, cfg) == pytest.approx(2e-6) and lr_at(49, cfg) == pytest.approx(1e-4)
    assert lr_at(99, cfg) == lr_at(5000, cfg) == pytest.approx(2e-4)
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(10**6, 0.999) == 0.999


def test_cosine_decay_after_the_constant_phase():
    cfg = TrainConfig(model_config="", lr=2e-4, warmup_steps=10, decay_start_step=100, decay_steps=50, min_lr=1e-5)
    assert lr_at(99, cfg) == pytest.approx(2e-4) and lr_at(100, cfg) == pytest.approx(2e-4)
    assert lr_at(125, cfg) == pytest.approx((2e-4 + 1e-5) / 2)
    assert lr_at(150, cfg) == lr_at(10**6, cfg) == pytest.approx(1e-5)
    assert all(lr_at(i, cfg) >= lr_at(i + 1, cfg) for i in range(100, 160))


def test_a_run_can_be_resumed_to_be_annealed_elsewhere(tmp_path):
    """Run length, output places and the final decay may change on resume; the recipe may not."""
    cfg, model_cfg = tiny_setup(tmp_path, max_steps=2)
    train(cfg, model_cfg, progress=False)
    annealed = dataclasses.replace(cfg, max_steps=4, out_dir=str(tmp_path / "anneal"), decay_start_step=2,
                                   decay_steps=2)
    state = train(annealed, model_cfg, resume=tmp_path / "run" / "checkpoint.pt", progress=False,
                  export=tmp_path / "annealed.pt")
    assert state.step == 4 and (tmp_path / "annealed.pt").is_file()
    assert (tmp_path / "anneal" / "checkpoint.pt").is_file()


def test_diffusion_loss_noises_with_q_sample_and_compares_the_first_three_channels():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0, 437, 999])
    seen = {}

    def spy(x_t, t_in):  # returns ε̂ = ε + 0.1 and 3 junk channels that must be ignored
        seen["x_t"], seen["t"] = x_t, t_in
        return torch.cat([eps + 0.1, torch.full_like(eps, 50.0)], dim=1)

    loss = diffusion_loss(spy, x0, t, eps)
    assert loss.item() == pytest.approx(0.01, rel=1e-5)
    assert torch.equal(seen["t"], t)
    for b in range(3):
        assert torch.equal(seen["x_t"][b], q_sample(x0[b], int(t[b]), eps[b]))


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------

def test_loss_decreases_and_export_loads_strictly(tmp_path):
    cfg, model_cfg = tiny_setup(tmp_path)
    state = train(cfg, model_cfg, progress=False, export=model_cfg["model_path"])
    assert state.step == 40 and len(state.losses) == 40
    first, last = np.mean(state.losses[:8]), np.mean(state.losses[-8:])
    assert last < 0.7 * first, (first, last)

    model = create_model(**model_cfg)  # strict load of the export
    exported = torch.load(model_cfg["model_path"], map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in exported.values())
    for name, value in model.state_dict().items():
        assert torch.equal(value, state.ema[name])
    assert not torch.equal(model.state_dict()["out.2.weight"], state.model.state_dict()["out.2.weight"])  # EMA, not raw
    x = torch.zeros(1, 3, 24, 32)
    assert model(x, torch.tensor([10])).shape == (1, 3, 24, 32)  # fully convolutional
    in_run = torch.load(tmp_path / "run" / "ema.pt", map_location="cpu", weights_only=True)  # always written
    assert all(torch.equal(in_run[k], exported[k]) for k in exported)


def test_resume_continues_exactly(tmp_path):
    cfg, model_cfg = tiny_setup(tmp_path, max_steps=6)
    full = train(cfg, model_cfg, progress=False)

    part_cfg = dataclasses.replace(cfg, max_steps=3, out_dir=str(tmp_path / "part"))
    part_model_cfg = {**model_cfg, "model_path": str(tmp_path / "part_prior.pt")}
    train(part_cfg, part_model_cfg, progress=False)
    ckpt = torch.load(tmp_path / "part" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3 and set(ckpt) >= {"model", "ema", "optimizer", "generator", "torch_rng", "train_config"}

    resumed = train(dataclasses.replace(part_cfg, max_steps=6), part_model_cfg,
                    resume=tmp_path / "part" / "checkpoint.pt", progress=False)
    assert resumed.step == 6
    assert resumed.losses == full.losses
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
        assert torch.equal(full.ema[name], resumed.ema[name]), name
    adam_full, adam_resumed = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(adam_full[i]["exp_avg_sq"], adam_resumed[i]["exp_avg_sq"]) for i in adam_full)


def test_resume_with_other_settings_fails(tmp_path):
    cfg, model_cfg = tiny_setup(tmp_path, max_steps=1)
    train(cfg, model_cfg, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(dataclasses.replace(cfg, lr=5e-4), model_cfg, resume=tmp_path / "run" / "checkpoint.pt", progress=False)


def test_time_budget_stops_and_saves(tmp_path):
    cfg, model_cfg = tiny_setup(tmp_path)
    state = train(cfg, model_cfg, max_minutes=0.0, progress=False)
    assert state.step == 0
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    create_model(**{**model_cfg, "model_path": str(tmp_path / "run" / "ema.pt")})  # the step-0 weights already load
    assert not (tmp_path / "prior.pt").exists()  # the model config's model_path is never written


# ------------------------------------------------------------------------------------------
# The command line: what it writes, and its errors (one line, exit 2)
# ------------------------------------------------------------------------------------------

def cli_setup(tmp_path, model_overrides=None, **train_overrides):
    """A tiny model YAML and training YAML in tmp_path (max_steps 2, out_dir tmp_path/run); their paths and dicts."""
    cfg, model_cfg = tiny_setup(tmp_path, max_steps=2)
    model_cfg = {**model_cfg, **(model_overrides or {})}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(model_cfg))
    train_yaml = {**dataclasses.asdict(cfg), "model_config": str(tmp_path / "model.yaml"),
                  "scale_range": list(cfg.scale_range), **train_overrides}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train_yaml))
    return {"train": tmp_path / "train.yaml", "model": tmp_path / "model.yaml", "train_yaml": train_yaml,
            "model_cfg": model_cfg, "ckpt": tmp_path / "run" / "checkpoint.pt"}


def cli(p, *extra) -> list[str]:
    return ["--config", str(p["train"]), "--device", "cpu", *extra]


def one_error(code, capsys) -> str:
    """The command failed with exit 2 and printed exactly one line, `error: ...`, and no traceback."""
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def ok(code, capsys) -> bool:
    """The command succeeded; its output (progress bars, logs) is discarded."""
    capsys.readouterr()
    return code == 0


def digest(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_cli_trains_and_resumes(tmp_path):
    p = cli_setup(tmp_path)
    assert main(cli(p)) == 0
    assert torch.load(p["ckpt"], weights_only=True)["step"] == 2
    assert (tmp_path / "run" / "ema.pt").is_file() and not (tmp_path / "prior.pt").exists()  # model_path untouched
    assert not (tmp_path / "run" / ".lock").exists()  # released

    assert main(cli(p, "--resume", str(p["ckpt"]), "--max_steps", "3")) == 0
    assert torch.load(p["ckpt"], weights_only=True)["step"] == 3


def test_the_shipped_prior_is_read_only_to_training(tmp_path, capsys, monkeypatch):
    """The demo config with no --export writes only into its out_dir; --export onto the shipped prior is
    refused without --force (before any training: `train` is replaced so that nothing could be written)."""
    shipped = ROOT / "models" / "demo_prior.pt"
    before = (digest(shipped), shipped.stat().st_mtime_ns)
    monkeypatch.chdir(ROOT)
    demo = ["--config", "training_configurations/demo.yaml", "--device", "cpu", "--out_dir", str(tmp_path / "demo")]
    assert main(demo + ["--max_minutes", "0"]) == 0  # zero steps, saves at step 0: the old code replaced the prior
    assert (tmp_path / "demo" / "checkpoint.pt").is_file() and (tmp_path / "demo" / "ema.pt").is_file()
    assert (digest(shipped), shipped.stat().st_mtime_ns) == before
    capsys.readouterr()

    import guided_diffusion.train as train_module

    def must_not_train(*a, **k):
        raise AssertionError("the export should have been refused before training")

    monkeypatch.setattr(train_module, "train", must_not_train)
    for export in ("models/demo_prior.pt", str(shipped)):
        line = one_error(main(demo + ["--export", export, "--resume", str(tmp_path / "demo" / "checkpoint.pt")]), capsys)
        assert f"--export '{export}' is a file tracked by git (the shipped demo prior)" in line
        assert "pass --force to replace it" in line
    assert (digest(shipped), shipped.stat().st_mtime_ns) == before


def test_export_onto_existing_files_needs_force_except_the_runs_own(tmp_path, capsys):
    p = cli_setup(tmp_path)
    own = tmp_path / "exports" / "mine.pt"
    assert ok(main(cli(p, "--export", str(own))), capsys)
    assert own.is_file() and torch.load(p["ckpt"], weights_only=True)["export"] == str(own.resolve())
    # resuming may rewrite the run's own export
    assert ok(main(cli(p, "--resume", str(p["ckpt"]), "--max_steps", "3", "--export", str(own))), capsys)
    # the model config's model_path and any other existing file are refused without --force
    (tmp_path / "prior.pt").write_bytes(own.read_bytes())
    (tmp_path / "other.pt").write_bytes(b"someone's weights")
    line = one_error(main(cli(p, "--resume", str(p["ckpt"]), "--export", str(tmp_path / "prior.pt"))), capsys)
    assert "is the model_path of the model config" in line and "--force" in line
    line = one_error(main(cli(p, "--resume", str(p["ckpt"]), "--export", str(tmp_path / "other.pt"))), capsys)
    assert f"--export '{tmp_path / 'other.pt'}' is an existing file" in line
    assert (tmp_path / "other.pt").read_bytes() == b"someone's weights"
    assert ok(main(cli(p, "--resume", str(p["ckpt"]), "--export", str(tmp_path / "other.pt"), "--force")), capsys)
    create_model(**{**p["model_cfg"], "model_path": str(tmp_path / "other.pt")})
    # a folder, or the checkpoint itself, is not an export path
    assert "is a folder" in one_error(main(cli(p, "--resume", str(p["ckpt"]), "--export", str(tmp_path))), capsys)
    line = one_error(main(cli(p, "--resume", str(p["ckpt"]), "--export", str(p["ckpt"]), "--force")), capsys)
    assert "is the training checkpoint" in line


def test_a_file_tracked_by_git_is_refused(tmp_path, capsys):
    import subprocess

    p = cli_setup(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "weights.pt").write_bytes(b"tracked")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "weights.pt"], check=True)
    line = one_error(main(cli(p, "--max_steps", "1", "--export", str(repo / "weights.pt"))), capsys)
    assert "is a file tracked by git;" in line and (repo / "weights.pt").read_bytes() == b"tracked"


def test_a_run_folder_holds_one_run(tmp_path, capsys):
    from util.run_lock import RunLock

    p = cli_setup(tmp_path)
    assert ok(main(cli(p)), capsys)
    first = digest(p["ckpt"])
    line = one_error(main(cli(p)), capsys)  # a fresh run onto the finished one
    assert f"out_dir '{tmp_path / 'run'}' already holds another training run" in line
    assert f"--resume {p['ckpt']}" in line and "--force" in line and digest(p["ckpt"]) == first
    assert ok(main(cli(p, "--out_dir", str(tmp_path / "run2"))), capsys)
    line = one_error(main(cli(p, "--resume", str(tmp_path / "run2" / "checkpoint.pt"))), capsys)
    assert "already holds another training run" in line  # resuming run2 into run would overwrite run
    with RunLock(tmp_path / "run"):  # another training process holds the folder
        line = one_error(main(cli(p, "--resume", str(p["ckpt"]), "--max_steps", "3")), capsys)
        assert "is in use by pid" in line and "use another --out_dir" in line
    assert ok(main(cli(p, "--force")), capsys)  # start over


@pytest.mark.parametrize("content, expected", [
    (None, r"training config file '.*nope\.yaml' not found; give a training YAML"),
    ("model_config: [unclosed\n", r"is not valid YAML at line \d+, column \d+"),
    ("- a list\n", r"must be a mapping of key: value lines, got a list"),
    ("lr: 1.0e-3\n", r"model_config is missing; set it to a model YAML"),
    ("model_config: m.yaml\nlearning_rate: 1.0\n", r"unknown key\(s\) \['learning_rate'\]; valid keys are"),
])
def test_config_file_errors_are_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / ("nope.yaml" if content is None else "t.yaml")
    if content is not None:
        path.write_text(content)
    line = one_error(main(["--config", str(path)]), capsys)
    assert re.search(expected, line), line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, expected", [
    ({"batch_size": "eight"}, "batch_size must be a whole number, got 'eight'"),
    ({"batch_size": True}, "batch_size must be a whole number, got True"),
    ({"lr": "fast"}, "lr must be a number, got 'fast'"),
    ({"scale_range": 0.5}, r"scale_range must be a list of two numbers \[min, max\], got 0.5"),
    ({"scale_range": [1.0, 0.5]}, r"scale_range must be \[min, max\] with 0 < min <= max, got \[1.0, 0.5\]"),
    ({"ema_decay": 1.5}, r"ema_decay must be in \[0, 1\), got 1.5"),
    ({"precision": "fp8"}, "precision must be one of fp32, bf16, got 'fp8'"),
    ({"max_steps": 0}, "max_steps must be >= 1, got 0"),
    ({"lr": -1.0}, "lr must be > 0, got -1.0"),
    ({"checkpoint_minutes": 0}, "checkpoint_minutes must be > 0"),
    ({"crop_size": 15}, "crop_size 15 is not a multiple of 2"),
    ({"model_config": "missing_model.yaml"}, r"model config file '.*missing_model.yaml' not found; set model_config"),
    ({"data": "no_such_folder"}, r"training data: folder 'no_such_folder' does not exist; set data:"),
    ({"crop_size": 64}, r"images #0 \(40x48\), #1 \(40x48\), #2 \(40x48\) are smaller than crop_size=64"),
])
def test_bad_config_values_are_one_line_naming_file_key_and_value(tmp_path, capsys, monkeypatch, override, expected):
    monkeypatch.chdir(tmp_path)
    p = cli_setup(tmp_path, **override)
    line = one_error(main(cli(p)), capsys)
    assert re.search(expected, line), line
    if "training data" not in line:
        assert str(p["train"]) in line or "model config" in line
    assert not p["ckpt"].exists()


def test_lr_written_without_a_dot_is_a_number(tmp_path):
    p = cli_setup(tmp_path)
    p["train"].write_text(p["train"].read_text().replace("lr: 0.001", "lr: 1e-3"))
    assert "1e-3" in p["train"].read_text()  # YAML 1.1 reads this as a string
    assert load_train_config(p["train"]).lr == 1e-3


@pytest.mark.parametrize("model_override, expected", [
    ({"typo": 1}, r"model config '.*model.yaml': unknown key\(s\) \['typo'\]"),
    ({"learn_sigma": True}, "training learns ε only; set learn_sigma: false"),
    ({"num_channels": 30}, r"model config '.*model.yaml': num_channels=30 .*\(GroupNorm groups\); change num_channels or channel_mult$"),
])
def test_bad_model_configs_are_one_line(tmp_path, capsys, model_override, expected):
    p = cli_setup(tmp_path, model_overrides=model_override)
    assert re.search(expected, one_error(main(cli(p)), capsys))


def test_bad_flags_are_one_line(tmp_path, capsys):
    p = cli_setup(tmp_path)
    assert "--max_minutes -1: must be >= 0" in one_error(main(cli(p, "--max_minutes", "-1")), capsys)
    assert "--max_steps 0: must be >= 1" in one_error(main(cli(p, "--max_steps", "0")), capsys)
    assert "argument --max_steps: invalid int value: 'many'" in one_error(main(cli(p, "--max_steps", "many")), capsys)
    assert "--device 'gpu0' is not a device" in one_error(main(["--config", str(p["train"]), "--device", "gpu0"]), capsys)
    if not torch.cuda.is_available():
        line = one_error(main(["--config", str(p["train"]), "--device", "cuda"]), capsys)
        assert "no CUDA GPU is available here; use --device cpu" in line
    assert "required: --config" in one_error(main([]), capsys)


def test_unwritable_output_folders_are_one_line(tmp_path, capsys):
    p = cli_setup(tmp_path)
    (tmp_path / "a_file").write_text("in the way")
    line = one_error(main(cli(p, "--out_dir", str(tmp_path / "a_file" / "run"))), capsys)
    assert f"cannot create run folder '{tmp_path / 'a_file' / 'run'}'" in line and "use a writable --out_dir" in line
    line = one_error(main(cli(p, "--export", str(tmp_path / "a_file" / "prior.pt"))), capsys)
    assert f"--export '{tmp_path / 'a_file' / 'prior.pt'}': cannot write in the folder" in line


def test_resume_errors_are_one_line(tmp_path, capsys):
    p = cli_setup(tmp_path)
    line = one_error(main(cli(p, "--resume", str(tmp_path / "gone.pt"))), capsys)
    assert f"--resume '{tmp_path / 'gone.pt'}': not found; give the checkpoint.pt of an earlier training run" in line
    assert ok(main(cli(p, "--export", str(tmp_path / "exported.pt"))), capsys)
    line = one_error(main(cli(p, "--resume", str(tmp_path / "exported.pt"))), capsys)
    assert "not a training checkpoint (it lacks 'step', 'model', 'ema', 'optimizer')" in line
    data = p["ckpt"].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    line = one_error(main(cli(p, "--resume", str(tmp_path / "cut.pt"), "--out_dir", str(tmp_path / "r2"))), capsys)
    assert f"--resume: cannot read checkpoint '{tmp_path / 'cut.pt'}': the file is truncated or damaged" in line
    assert line.endswith("resume from another copy, or start afresh without --resume")
    p["train"].write_text(yaml.safe_dump({**p["train_yaml"], "lr": 5e-4}))
    line = one_error(main(cli(p, "--resume", str(p["ckpt"]))), capsys)
    assert "trained with different settings" in line and "lr (checkpoint 0.001, now 0.0005)" in line


def test_the_module_command_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "guided_diffusion.train", "--config", str(tmp_path / "none.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: training config file '{tmp_path / 'none.yaml'}' not found; give a training YAML such as "
        f"training_configurations/demo.yaml"]


# ------------------------------------------------------------------------------------------
# Checkpoint files that torch cannot read (util/checkpoints.py)
# ------------------------------------------------------------------------------------------

def test_a_truncated_or_corrupt_checkpoint_is_one_whole_line(tmp_path):
    from util.checkpoints import CheckpointError

    model_cfg = {**TINY_MODEL, "model_path": None}
    torch.save(create_model(**model_cfg).state_dict(), tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    cases = {"cut.pt": data[: len(data) // 2], "end_cut.pt": data[:-1], "empty.pt": b"", "text.pt": b"not a checkpoint"}
    expected = {"cut.pt": f"the file is truncated or damaged ({len(data) // 2:,} bytes): a torch zip archive whose end",
                "end_cut.pt": "the file is truncated or damaged", "empty.pt": "the file is empty (0 bytes",
                "text.pt": "the file is not a PyTorch checkpoint (16 bytes)"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            create_model(**{**model_cfg, "model_path": str(tmp_path / name)})
        message = str(err.value)
        assert "\n" not in message and "\x1b" not in message
        assert f"cannot read checkpoint '{tmp_path / name}': {expected[name]}" in message, message
        assert message.endswith("re-download it from the place you got it from and check its SHA-256 with "
                                "`python dcdp.py --check_models`"), message
    # legacy (non-zip) format, cut short
    torch.save(create_model(**model_cfg).state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "legacy.pt").read_bytes()
    (tmp_path / "legacy.pt").write_bytes(legacy[:-5])
    with pytest.raises(CheckpointError, match=r"legacy\.pt': the file is truncated or corrupt \([\d,]+ bytes; "
                                              r"RuntimeError: unexpected EOF, expected 5 more bytes\); re-download"):
        create_model(**{**model_cfg, "model_path": str(tmp_path / "legacy.pt")})
