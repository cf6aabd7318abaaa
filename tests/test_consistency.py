"""Consistency models: checkpoint layouts, attention order, preconditioning, loading, the purifier."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from consistency_models import (
    CMAttentionBlock,
    ConsistencyDenoiser,
    ConsistencyPurifier,
    boundary_scalings,
    build_network,
    karras_sigmas,
    load_consistency_model,
    noise_conditioning,
    refinement_sigmas,
    sigma_from_timestep,
)
from consistency_models.network import NETWORK_DEFAULTS
from util.checkpoints import CheckpointError
from guided_diffusion.gaussian_diffusion import q_sample
from guided_diffusion.unet import create_model

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "models" / "manifests"
SHIPPED = {
    "model_config_cm_bedroom.yaml": "cd_bedroom256_lpips.json",
    "model_config_cm_imagenet64.yaml": "cd_imagenet64_l2.json",
}
CM_PURIFICATION_CONFIGS = sorted((ROOT / "purification_configurations").glob("purification_config_cm_*.yaml"))
# Every kind of block: 2 levels, attention at 16 px and in the middle, up/down ResBlocks, 4 heads of 16.
TINY = dict(
    kind="consistency",
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="16",
    num_head_channels=16,
    resblock_updown=True,
    use_scale_shift_norm=False,
    model_path=None,
)
TINY_COND = {**TINY, "class_cond": True, "use_scale_shift_norm": True}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models are far faster on one thread on a shared 2-core machine (no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter (the reference zero-initialises residual branches and the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            std = 0.1 if p.ndim == 1 else fan_in**-0.5
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith("norm.weight") else 0.0))
    return module


def tiny_purifier(config: dict = TINY, seed: int = 0, **cm_options) -> ConsistencyPurifier:
    purifier = ConsistencyPurifier(config, "cpu", **cm_options)
    randomise(purifier.denoiser.net, seed)
    return purifier


def images(b: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# --- shipped configurations match the public checkpoints' layouts --------------------------------

@pytest.mark.parametrize("config_file,manifest_file", SHIPPED.items())
def test_shipped_config_matches_manifest(config_file: str, manifest_file: str) -> None:
    config = yaml.safe_load((ROOT / "model_configurations" / config_file).read_text())
    manifest = json.loads((MANIFESTS / manifest_file).read_text())
    assert config["kind"] == "consistency"
    assert config["model_path"] == f"models/{manifest['checkpoint']}"
    assert {k: v for k, v in manifest["config"].items()} == config
    with torch.device("meta"):
        net = build_network(**{k: config[k] for k in NETWORK_DEFAULTS})
    shapes = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert shapes == manifest["state_dict"]  # names, shapes and registration order
    assert sum(p.numel() for p in net.parameters()) == manifest["param_count"]


def test_manifest_attention_layouts() -> None:
    sd = dict((k, s) for k, s in json.loads((MANIFESTS / "cd_imagenet64_l2.json").read_text())["state_dict"])
    assert sd["input_blocks.5.1.qkv.weight"] == [3 * 384, 384, 1, 1]  # 2-D 1x1 conv, unlike ADM's Conv1d
    assert sd["label_emb.weight"] == [1000, 768]
    assert sd["input_blocks.1.0.emb_layers.1.weight"] == [2 * 192, 768]  # scale-shift norm
    sd = dict((k, s) for k, s in json.loads((MANIFESTS / "cd_bedroom256_lpips.json").read_text())["state_dict"])
    assert sd["input_blocks.1.0.emb_layers.1.weight"] == [256, 1024]  # no scale-shift norm on LSUN
    assert "label_emb.weight" not in sd


def test_heads_are_channels_over_64() -> None:
    config = yaml.safe_load((ROOT / "model_configurations" / "model_config_cm_imagenet64.yaml").read_text())
    with torch.device("meta"):
        net = build_network(**{k: config[k] for k in NETWORK_DEFAULTS})
    heads = sorted({(m.qkv.in_channels, m.num_heads) for m in net.modules() if isinstance(m, CMAttentionBlock)})
    assert heads == [(384, 6), (576, 9), (768, 12)]


# --- attention: q|k|v-major channel order ---------------------------------------------------------

def explicit_attention(block: CMAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The reference's layout written out: qkv.chunk(3) into [all q | all k | all v], heads contiguous."""
    b, c, h, w = x.shape
    heads, d = block.num_heads, c // block.num_heads
    qkv = block.qkv(block.norm(x)).reshape(b, 3 * c, h * w)
    q, k, v = (z.reshape(b * heads, d, h * w) for z in qkv.chunk(3, dim=1))
    weight = torch.softmax(torch.einsum("bdt,bds->bts", q, k) / math.sqrt(d), dim=-1)
    a = torch.einsum("bts,bds->bdt", weight, v).reshape(b, c, h, w)
    return x + block.proj_out(a)


def test_attention_equals_explicit_and_order_matters() -> None:
    block = randomise(CMAttentionBlock(64, num_head_channels=16), seed=3)
    x = torch.randn(2, 64, 5, 7, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out, ref = block(x), explicit_attention(block, x)
        # the same weights read in ADM's legacy per-head [q k v] grouping
        qkv = block.qkv(block.norm(x)).reshape(2 * 4, 3 * 16, 35)
        q, k, v = qkv.split(16, dim=1)
        a = torch.einsum("bts,bds->bdt", torch.softmax(torch.einsum("bdt,bds->bts", q, k) / 4, dim=-1), v)
        legacy = x + block.proj_out(a.reshape(2, 64, 5, 7))
    assert (out - ref).abs().max().item() < 1e-5
    assert (legacy - ref).abs().max().item() > 1e-2


def test_network_equals_adm_unet_with_new_attention_order() -> None:
    """The CM UNet is ADM's with new-order attention in 1x1 Conv2d weights: same numbers once squeezed."""
    net = randomise(build_network(**{k: v for k, v in TINY_COND.items() if k in NETWORK_DEFAULTS}), seed=5)
    adm_cfg = {k: v for k, v in TINY_COND.items() if k not in ("kind",)}
    adm = create_model(**adm_cfg, learn_sigma=False, use_new_attention_order=True)
    sd = {k: (v[..., 0] if k.endswith(("qkv.weight", "proj_out.weight")) else v) for k, v in net.state_dict().items()}
    adm.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    c_noise = torch.tensor(noise_conditioning([0.002, 3.0]), dtype=torch.float32)
    y = torch.tensor([5, 999])
    with torch.no_grad():
        out, ref = net(x, c_noise, y), adm(x, c_noise, y)
    assert out.shape == (2, 3, 32, 32)
    assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_bfloat16_torso_close_to_float32() -> None:
    net = randomise(build_network(**{k: v for k, v in TINY.items() if k in NETWORK_DEFAULTS}), seed=7)
    x, c_noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(8)), torch.tensor([100.0])
    with torch.no_grad():
        ref = net(x, c_noise)
        net.torso_dtype = torch.bfloat16
        out = net(x, c_noise)
    assert out.dtype == torch.float32
    assert 0 < (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_network_input_errors() -> None:
    net = build_network(**{k: v for k, v in TINY_COND.items() if k in NETWORK_DEFAULTS})
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.zeros(1, 3, 32, 31), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="class_cond"):
        net(torch.zeros(1, 3, 32, 32), torch.zeros(1))


# --- preconditioning -------------------------------------------------------------------------------

def test_boundary_scalings_against_formulas() -> None:
    sd, smin = 0.5, 0.002
    for s in (0.002, 0.01, 0.5, 2.0, 80.0):
        c_skip, c_out, c_in = boundary_scalings(s)
        assert c_skip == pytest.approx(sd**2 / ((s - smin) ** 2 + sd**2), rel=1e-12)
        assert c_out == pytest.approx((s - smin) * sd / math.sqrt(s**2 + sd**2), rel=1e-12, abs=1e-15)
        assert c_in == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-12)
    assert boundary_scalings(0.002)[:2] == (1.0, 0.0)
    c_skip, c_out, c_in = boundary_scalings(80.0)  # values quoted in the reference notes
    assert (c_skip, c_out, c_in) == pytest.approx((3.906e-5, 0.49998, 0.0124998), rel=1e-4)
    assert noise_conditioning([0.002, 1.0, 80.0]) == pytest.approx([250 * math.log(0.002), 0.0, 250 * math.log(80.0)])


def test_karras_sigmas() -> None:
    s = karras_sigmas(40)
    assert s[0] == pytest.approx(80.0) and s[-1] == pytest.approx(0.002) and np.all(np.diff(s) < 0)
    rho = 7.0
    assert s[22] == pytest.approx((80 ** (1 / rho) + 22 / 39 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho)


class RecordingNet(torch.nn.Module):
    """A stand-in for F that records its inputs and returns a fixed field."""

    num_classes = None

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.field = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(9))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, y=None) -> torch.Tensor:
        self.calls.append((x, c_noise))
        return self.field


def test_denoiser_applies_preconditioning() -> None:
    net = RecordingNet()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(10))
    sigma = np.array([0.3, 7.0])
    out = ConsistencyDenoiser(net)(x, sigma)
    c_skip, c_out, c_in = (torch.tensor(c, dtype=torch.float32).view(2, 1, 1, 1) for c in boundary_scalings(sigma))
    x_in, c_noise = net.calls[0]
    assert torch.allclose(x_in, c_in * x, rtol=1e-6)
    assert torch.allclose(c_noise, torch.tensor(250 * np.log(sigma), dtype=torch.float32), rtol=1e-6)
    assert torch.allclose(out, c_skip * x + c_out * net.field, rtol=1e-6, atol=1e-7)


def test_boundary_condition_returns_input() -> None:
    denoiser = load_consistency_model(TINY)
    randomise(denoiser.net, seed=11)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(12)) * 3
    with torch.no_grad():
        assert torch.equal(denoiser(x, 0.002), x)
        assert (denoiser(x, 0.003) - x).abs().max() > 1e-4
    with pytest.raises(ValueError, match="sigma must lie in"):
        denoiser(x, 0.001)


# --- loading ---------------------------------------------------------------------------------------

def test_saved_state_dict_loads_strictly(tmp_path: Path) -> None:
    source = load_consistency_model(TINY_COND)
    randomise(source.net, seed=13)
    path = tmp_path / "tiny_cm.pt"
    torch.save(source.net.state_dict(), path)
    loaded = load_consistency_model({**TINY_COND, "model_path": str(path)})
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x, y = images(b=1), torch.tensor([17])
    with torch.no_grad():
        assert torch.equal(loaded(x, 1.5, y), source(x, 1.5, y))


def test_mismatching_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "cd_imagenet64_l2.pt"
    torch.save(build_network(**{k: v for k, v in TINY.items() if k in NETWORK_DEFAULTS}).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not match the model config.*missing keys.*label_emb") as err:
        load_consistency_model({**TINY_COND, "model_path": str(path)})
    assert "\n" not in str(err.value)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_consistency_model({**TINY_COND, "model_path": str(path)})


def test_missing_checkpoint_names_file_and_download_page() -> None:
    config = yaml.safe_load((ROOT / "model_configurations" / "model_config_cm_bedroom.yaml").read_text())
    config["model_path"] = "models/does_not_exist/cd_bedroom256_lpips.pt"
    with torch.device("meta"), pytest.raises(CheckpointError) as err:
        load_consistency_model(config)
    msg = str(err.value)
    assert "\n" not in msg and "not found" in msg
    assert "models/does_not_exist/cd_bedroom256_lpips.pt" in msg
    assert "github.com/openai/consistency_models" in msg
    assert "openaipublic.blob.core.windows.net/consistency/cd_bedroom256_lpips.pt" in msg


@pytest.mark.parametrize(
    "change,match",
    [
        ({"num_chanels": 32}, "unknown key"),
        ({"kind": "pixel"}, "kind"),
        ({"class_label": 3}, "class_cond is false"),
        ({"class_cond": True, "class_label": 1000}, r"\[0, 999\]"),
        ({"channel_mult": "1,1.5"}, "multiple of 32"),
        ({"sigma_min": 0.0}, "sigma_min"),
    ],
)
def test_bad_model_config(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_consistency_model({**TINY, **change})


# --- the purifier: noise level per outer iteration -------------------------------------------------

def test_timestep_to_sigma_mapping() -> None:
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    for T in (1, 44, 400, 700, 1000):
        a = alpha_bar[T - 1]
        assert sigma_from_timestep(T) == pytest.approx(math.sqrt((1 - a) / a), rel=1e-12)
    assert sigma_from_timestep(400) == pytest.approx(2.0309, abs=1e-4)
    assert sigma_from_timestep(1) == pytest.approx(0.0100005, abs=1e-7)
    # same signal-to-noise ratio as the pixel purifier: q_sample(x, T−1, n)/√ᾱ = x + σ·n
    x, n = images(b=1, size=8), torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(14))
    a = alpha_bar[399]
    assert torch.allclose(q_sample(x, 399, n) / math.sqrt(a), x + sigma_from_timestep(400) * n, atol=1e-5)
    with pytest.raises(ValueError, match="T_k"):
        sigma_from_timestep(0)


def test_sigma_is_clipped_and_direct_schedule_decays_geometrically() -> None:
    purifier = tiny_purifier()
    assert purifier.sigma(1000) == 80.0  # √((1−ᾱ)/ᾱ) ≈ 157 is clipped to σ_max
    assert purifier.sigma(400) == pytest.approx(sigma_from_timestep(400))
    direct = tiny_purifier(cm_sigma_schedule="direct", cm_sigma_init=2.0, cm_sigma_end=0.02)
    s = [direct.sigma(400, k=k, K=5) for k in range(5)]
    assert s[0] == pytest.approx(2.0) and s[-1] == pytest.approx(0.02)
    assert np.allclose(np.array(s[1:]) / np.array(s[:-1]), 0.1**0.5)
    assert direct.levels([400] * 5) == s  # the loop asks the prior for its level of every round
    assert purifier.levels([1000, 400]) == [80.0, purifier.sigma(400)]
    with pytest.raises(ValueError, match="k=k, K=K"):
        direct.sigma(400)
    with pytest.raises(ValueError, match="k=5"):
        direct.sigma(400, k=5, K=5)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"cm_sigma_schedule": "cosine"}, "cm_sigma_schedule"),
        ({"cm_sigma_schedule": "direct"}, "cm_sigma_init"),
        ({"cm_sigma_schedule": "direct", "cm_sigma_init": 0.1, "cm_sigma_end": 1.0}, "cm_sigma_end <= cm_sigma_init"),
        ({"cm_multistep": -1}, "cm_multistep"),
        ({"cm_steps": 2}, "unknown consistency-model key"),
    ],
)
def test_bad_cm_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConsistencyPurifier(TINY, "cpu", **options)


# --- the purifier: behaviour -----------------------------------------------------------------------

def test_purify_shape_range_and_determinism() -> None:
    purifier = tiny_purifier()
    x = images() * 1.5  # data-consistency iterates may leave [-1, 1]
    out = purifier.purify(x, sigma_from_timestep(400), generators(0, 1))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, purifier.purify(x, sigma_from_timestep(400), generators(0, 1)))
    assert (out - purifier.purify(x, sigma_from_timestep(400), generators(0, 2)))[1].abs().max() > 1e-3
    assert torch.equal(out[0], purifier.purify(x, sigma_from_timestep(400), generators(0, 2))[0])
    # an image's result does not depend on the batch it is in
    alone = purifier.purify(x[1:], sigma_from_timestep(400), generators(1))
    assert (alone[0] - out[1]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="one generator per image"):
        purifier.purify(x, sigma_from_timestep(400), generators(0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        purifier.purify(x[0], sigma_from_timestep(400), generators(0))


def test_purify_is_one_consistency_step() -> None:
    purifier = tiny_purifier()
    x, gens = images(b=1), generators(3)
    sigma = sigma_from_timestep(222)
    noise = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(3))[None]
    with torch.no_grad():
        expected = purifier.denoiser(x + float(np.float32(sigma)) * noise, sigma).clamp(-1, 1)
    assert torch.equal(purifier.purify(x, sigma_from_timestep(222), gens), expected)
    assert purifier.nfe(222) == 1


def test_multistep_refinements() -> None:
    assert refinement_sigmas(2.0, 0, 0.002) == [2.0]
    s = refinement_sigmas(2.0, 2, 0.002)
    rho = 7.0
    expected = [(2.0 ** (1 / rho) + j / 3 * (0.002 ** (1 / rho) - 2.0 ** (1 / rho))) ** rho for j in range(3)]
    assert s == pytest.approx(expected) and s[0] == 2.0 and s[-1] > 0.002 and np.all(np.diff(s) < 0)

    purifier = tiny_purifier(cm_multistep=2)
    sigmas_seen: list[float] = []
    hook = purifier.denoiser.net.register_forward_hook(lambda m, args, out: sigmas_seen.append(float(args[1][0])))
    x = images()
    out = purifier.purify(x, sigma_from_timestep(400), generators(0, 1))
    hook.remove()
    assert purifier.nfe(400) == 3 and len(sigmas_seen) == 3
    assert sigmas_seen == pytest.approx([250 * math.log(s) for s in refinement_sigmas(purifier.sigma(400), 2, purifier.denoiser.sigma_min)],
                                         rel=1e-5)
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, purifier.purify(x, sigma_from_timestep(400), generators(0, 1)))
    one_step = tiny_purifier().purify(x, sigma_from_timestep(400), generators(0, 1))
    assert (out - one_step).abs().max() > 1e-3


def test_class_labels() -> None:
    assert tiny_purifier().class_labels(generators(0, 1)) is None
    fixed = tiny_purifier({**TINY_COND, "class_label": 207})
    assert fixed.class_labels(generators(0, 1)).tolist() == [207, 207]
    drawn = tiny_purifier(TINY_COND)
    gens = generators(0, 1, 2, 3)
    states = [g.get_state() for g in gens]
    labels = drawn.class_labels(gens)
    assert labels.dtype == torch.long and labels.min() >= 0 and labels.max() < 1000
    assert len(set(labels.tolist())) > 1
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))  # the noise stream is untouched
    assert torch.equal(drawn.class_labels(generators(2)), labels[2:3])  # per image, batch-independent
    out = drawn.purify(images(b=2), sigma_from_timestep(300), generators(0, 1))
    other = tiny_purifier({**TINY_COND, "class_label": 3}).purify(images(b=2), sigma_from_timestep(300), generators(0, 1))
    assert out.shape == (2, 3, 32, 32) and (out - other).abs().max() > 1e-4


def test_init_and_prior_interface() -> None:
    purifier = tiny_purifier()
    assert purifier.to_image is None
    assert torch.equal(purifier.init((2, 3, 32, 32), generators(0, 1)), torch.zeros(2, 3, 32, 32))


# --- shipped purification configs -----------------------------------------------------------------

PIXEL_KEYS = {
    "total_num_iterations", "csgm_num_iterations", "lr", "ddim_init_timestep", "ddim_end_timestep",
    "purification_schedule", "optimizer", "momentum", "ddim_num_iterations", "full_ddim", "use_weight_decay",
    "weight_decay_lambda", "save_every_main", "save_every_sub",
}
PAPER = {  # task: (K, tau, T_init, lr at 256 px)
    "super_resolution": (10, 100, 400, 1000),
    "gaussian_deblur": (10, 100, 400, 100000),
    "motion_deblur": (10, 100, 400, 100000),
    "inpainting": (20, 50, 700, 1000),
}


def test_all_cm_purification_configs_shipped() -> None:
    names = {p.name for p in CM_PURIFICATION_CONFIGS}
    expected = {f"purification_config_cm_bedroom_{t}.yaml" for t in PAPER}
    assert names == expected | {"purification_config_cm_imagenet64_super_resolution.yaml"}


@pytest.mark.parametrize("path", CM_PURIFICATION_CONFIGS, ids=lambda p: p.stem)
def test_cm_purification_config(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == {"purification", "dataset", "others"}  # the official layout
    cfg = raw["purification"]
    assert PIXEL_KEYS <= set(cfg)
    cm = {k: v for k, v in cfg.items() if k.startswith("cm_")}
    assert set(cfg) - PIXEL_KEYS == set(cm)
    ConsistencyPurifier._check_options(cm)  # accepted by the purifier
    task = path.stem.split("_cm_")[1].split("_", 1)[1]
    K, tau, T_init, lr = PAPER[task]
    size = 64 if "imagenet64" in path.stem else 256
    assert (cfg["total_num_iterations"], cfg["csgm_num_iterations"], cfg["ddim_init_timestep"]) == (K, tau, T_init)
    assert cfg["ddim_end_timestep"] == 0 and cfg["purification_schedule"] == "linear"
    assert cfg["lr"] == pytest.approx(lr * (size / 256) ** 2)  # same step lr·2/N per measurement entry
    assert raw["dataset"] == {"name": "folder", "root": "./data/imagenet64" if size == 64 else "./data/lsun_bedroom"}
    assert raw["others"]["img_size"] == [1, 3, size, size]


def test_pinned_purification() -> None:
    """Regression pin: a seeded tiny class-conditional model, one refinement, labels drawn per image."""
    purifier = tiny_purifier(TINY_COND, seed=21, cm_multistep=1)
    out = purifier.purify(images(b=2, seed=22), sigma_from_timestep(311), generators(7, 8))
    assert purifier.class_labels(generators(7, 8)).tolist() == [615, 723]
    assert out.mean(dim=(1, 2, 3)).tolist() == pytest.approx([-0.0136540, -0.0178760], abs=1e-5)
    assert out[:, 0, 5, 10:13].tolist() == [
        pytest.approx([-0.0806102, 0.0400359, -0.0676215], abs=1e-4),
        pytest.approx([0.1450690, -0.1075652, 0.0058281], abs=1e-4),
    ]
