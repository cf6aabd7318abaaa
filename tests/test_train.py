"""Training of the demo prior: crops, the ε-loss going down, exact resume, strict export, the CLI."""
import dataclasses

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
    state = train(annealed, {**model_cfg, "model_path": str(tmp_path / "annealed.pt")},
                  resume=tmp_path / "run" / "checkpoint.pt", progress=False)
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
    state = train(cfg, model_cfg, progress=False)
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
    create_model(**model_cfg)  # the step-0 export already loads


def test_cli_trains_and_resumes(tmp_path):
    cfg, model_cfg = tiny_setup(tmp_path, max_steps=2)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(model_cfg))
    train_yaml = {**dataclasses.asdict(cfg), "model_config": str(tmp_path / "model.yaml"),
                  "scale_range": list(cfg.scale_range)}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train_yaml))
    main(["--config", str(tmp_path / "train.yaml"), "--device", "cpu"])
    ckpt_path = tmp_path / "run" / "checkpoint.pt"
    assert torch.load(ckpt_path, weights_only=True)["step"] == 2

    train_yaml["max_steps"] = 3
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train_yaml))
    main(["--config", str(tmp_path / "train.yaml"), "--device", "cpu", "--resume", str(ckpt_path)])
    assert torch.load(ckpt_path, weights_only=True)["step"] == 3
