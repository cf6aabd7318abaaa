"""Latent DCDP: VQ-f4 autoencoder, LDM UNet, checkpoint loading, LDM schedule and latent purification."""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from util.checkpoints import CheckpointError
from latent_diffusion import LatentPrior, build_latent_model, ema_key, load_latent_model, parse_model_config
from latent_diffusion.attention import AttentionBlock, GEGLU, SpatialTransformer
from latent_diffusion.autoencoder import AttnBlock, Downsample, VQConfig, VQModel
from guided_diffusion.gaussian_diffusion import ddim_sample_unclipped as ddim_sample
from latent_diffusion.schedule import (
    latent_ddim_timesteps,
    ldm_betas,
    purify_latent,
    schedule_buffers,
)

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "models" / "manifests"
SHIPPED = {
    "model_config_ldm_ffhq.yaml": "ldm_ffhq256.json",
    "model_config_ldm_imagenet.yaml": "ldm_cin256-v2.json",
}

# Small configs with every kind of block: 32x32 images, 8x8 latents, attention at downsampling factor 2.
TINY = {
    "kind": "latent",
    "name": "tiny LDM",
    "model_path": None,
    "use_ema": True,
    "unet": {"image_size": 8, "model_channels": 32, "attention_resolutions": [2], "num_res_blocks": 1,
             "channel_mult": [1, 2], "num_heads": -1, "num_head_channels": 16},
    "first_stage": {"n_embed": 64, "resolution": 32, "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1},
}
TINY_CIN = {
    **TINY,
    "use_ema": False,
    "class_label": 4,
    "unet": {**TINY["unet"], "num_heads": 1, "num_head_channels": -1, "use_spatial_transformer": True, "context_dim": 16},
    "cond_stage": {"n_classes": 5, "embed_dim": 16},
}


def manifest(name: str) -> dict[str, list[int]]:
    return {k: shape for k, shape in json.loads((MANIFESTS / name).read_text())["state_dict"]}


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_latent_model(TINY).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Architecture against the public checkpoints' manifests (meta device: no memory, no compute)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("yaml_name,manifest_name", SHIPPED.items())
def test_shipped_config_matches_manifest(yaml_name, manifest_name):
    cfg = yaml.safe_load((ROOT / "model_configurations" / yaml_name).read_text())
    with torch.device("meta"):
        model = build_latent_model(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ours.update({k: list(v.shape) for k, v in model.schedule.items()})
    if cfg["use_ema"]:
        ours.update({ema_key("model." + k): list(p.shape) for k, p in model.model.named_parameters()})
        ours.update({"model_ema.decay": [], "model_ema.num_updates": []})
    assert ours == manifest(manifest_name)
    param_count = json.loads((MANIFESTS / manifest_name).read_text())["param_count"]
    assert sum(p.numel() for p in model.parameters()) == param_count


def test_vq_f4_matches_manifest_without_training_losses():
    cfg = yaml.safe_load((ROOT / "model_configurations" / "model_config_ldm_ffhq.yaml").read_text())["first_stage"]
    with torch.device("meta"):
        vq = VQModel(VQConfig(**cfg))
    expected = manifest("vq-f4.json")
    losses = [k for k in expected if k.startswith("loss.")]
    assert len(losses) == 55  # 33 LPIPS + 22 discriminator tensors (CompVis/latent-diffusion#87)
    assert {k: list(v.shape) for k, v in vq.state_dict().items()} == {k: s for k, s in expected.items() if k not in losses}


def test_attention_heads_follow_the_legacy_rule():
    with torch.device("meta"):
        ffhq = build_latent_model(yaml.safe_load((ROOT / "model_configurations/model_config_ldm_ffhq.yaml").read_text()))
        cin = build_latent_model(yaml.safe_load((ROOT / "model_configurations/model_config_ldm_imagenet.yaml").read_text()))
    heads = {c: b.num_heads for b in ffhq.modules() if isinstance(b, AttentionBlock) for c in [b.qkv.in_channels]}
    assert heads == {448: 14, 672: 21, 896: 28}  # head dim 32
    widths = {b.transformer_blocks[0].attn1.heads for b in cin.modules() if isinstance(b, SpatialTransformer)}
    assert widths == {1}  # one head as wide as the block


def test_ema_key_deletes_every_dot():
    assert ema_key("model.diffusion_model.input_blocks.4.1.qkv.weight") == "model_ema.diffusion_modelinput_blocks41qkvweight"


# ------------------------------------------------------------------------------------------------
# Blocks against their formulas
# ------------------------------------------------------------------------------------------------

def test_legacy_attention_groups_qkv_per_head():
    block = AttentionBlock(64, num_heads=4)
    x = torch.randn(2, 64, 5, 3)
    # QKVAttentionLegacy: the 3C channels are (heads, [q|k|v], head_dim); scores scaled by d^-1/2.
    qkv = block.qkv(block.norm(x.flatten(2)))
    q, k, v = qkv.reshape(2 * 4, 3 * 16, 15).split(16, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(16), dim=-1)
    h = torch.einsum("bts,bcs->bct", w, v).reshape(2, 64, 15)
    expected = x + block.proj_out(h).reshape(2, 64, 5, 3)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_vq_attention_is_single_head_over_all_channels():
    block = AttnBlock(32)
    x = torch.randn(1, 32, 4, 4)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (1, C, L)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * 32**-0.5, dim=-1)
    expected = x + block.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(1, 32, 4, 4))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_geglu_value_half_comes_first():
    geglu = GEGLU(4, 3)
    x = torch.randn(2, 4)
    out = geglu.proj(x)
    torch.testing.assert_close(geglu(x), out[:, :3] * F.gelu(out[:, 3:]))


def test_vq_downsample_pads_right_and_bottom_only():
    down = Downsample(32)
    x = torch.randn(1, 32, 8, 8)
    torch.testing.assert_close(down(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2))
    assert not torch.allclose(down(x), F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1), atol=1e-3)


def test_autoencoder_shapes_256_to_64_to_256():
    vq = VQModel(VQConfig(n_embed=16, ch=32, ch_mult=[1, 1, 1], num_res_blocks=1)).eval()
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        z = vq.encode(x)
        assert z.shape == (1, 3, 64, 64)
        assert vq.decode(z).shape == (1, 3, 256, 256)
    with pytest.raises(ValueError, match="multiple of 4"):
        vq.encode(torch.zeros(1, 3, 30, 32))


def test_quantiser_picks_nearest_codebook_vector_with_straight_through_gradient():
    vq = VQModel(VQConfig(n_embed=64, ch=32, ch_mult=[1, 2], num_res_blocks=1))
    z = torch.randn(2, 3, 5, 4, requires_grad=True)
    z_q = vq.quantize(z)
    codebook = vq.quantize.embedding.weight
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = codebook[torch.cdist(flat.double(), codebook.double()).argmin(dim=1)]
    torch.testing.assert_close(z_q.detach().permute(0, 2, 3, 1).reshape(-1, 3), nearest)
    w = torch.randn_like(z)
    (z_q * w).sum().backward()
    torch.testing.assert_close(z.grad, w)  # identity Jacobian
    assert vq.quantize.embedding.weight.grad is None


# ------------------------------------------------------------------------------------------------
# LDM schedule and the DCDP-LDM purification samplers
# ------------------------------------------------------------------------------------------------

def test_ldm_linear_schedule_is_linear_in_sqrt_beta():
    betas = ldm_betas()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    np.testing.assert_allclose(betas.numpy(), np.linspace(0.0015**0.5, 0.0195**0.5, 1000) ** 2, rtol=1e-14)
    ac = schedule_buffers(betas)["alphas_cumprod"]
    # Values listed in the checkpoint manifests (float64 reference build).
    assert ac[0].item() == pytest.approx(0.9985, rel=1e-12)
    assert ac[249].item() == pytest.approx(0.5105143007739076, rel=1e-10)
    assert ac[499].item() == pytest.approx(0.1158444908103479, rel=1e-10)
    assert ac[999].item() == pytest.approx(0.00014230397519201791, rel=1e-8)


def test_schedule_buffers_follow_their_definitions():
    buf = schedule_buffers(ldm_betas())
    ac, ac_prev, b = buf["alphas_cumprod"], buf["alphas_cumprod_prev"], buf["betas"]
    assert ac_prev[0] == 1 and torch.equal(ac_prev[1:], ac[:-1])
    torch.testing.assert_close(buf["sqrt_recipm1_alphas_cumprod"] ** 2, 1 / ac - 1)
    # The posterior mean of a noise-free x_t = √ᾱ_t x0 is √ᾱ_{t-1} x0.
    torch.testing.assert_close(buf["posterior_mean_coef1"] + buf["posterior_mean_coef2"] * ac.sqrt(), ac_prev.sqrt())
    torch.testing.assert_close(buf["posterior_variance"][1:], b[1:] * (1 - ac_prev[1:]) / (1 - ac[1:]))
    assert buf["posterior_log_variance_clipped"][0].item() == pytest.approx(math.log(1e-20))
    assert len(buf) == 12


def test_latent_ddim_timesteps_match_upstream():
    steps = latent_ddim_timesteps(20, 400)
    assert steps == [1, 22, 43, 64, 85, 106, 127, 148, 169, 190, 210, 231, 252, 273, 294, 315, 336, 357, 378, 399]
    assert latent_ddim_timesteps(20, 1000)[-1] == 999 and latent_ddim_timesteps(20, 1000)[0] == 1
    assert latent_ddim_timesteps(1, 1) == [1]
    assert latent_ddim_timesteps(2, 2) == [1, 1]  # a repeated step, as upstream
    assert latent_ddim_timesteps(5, 5) == [1, 2, 3, 3, 4]
    with pytest.raises(ValueError, match="num_steps"):
        latent_ddim_timesteps(0, 10)


def _point_mass_eps(z0: torch.Tensor, ac: torch.Tensor, calls: list):
    """The exact ε-model of a data distribution concentrated at z0: ε = (z_t − √ᾱ_t z0) / √(1−ᾱ_t)."""

    def eps(z_t, t):
        calls.append(int(t[0]))
        a = ac[int(t[0])]
        return (z_t - a.sqrt().item() * z0) / (1 - a).sqrt().item()

    return eps


def test_one_step_purification_is_tweedie_at_T_minus_1():
    ac = schedule_buffers(ldm_betas())["alphas_cumprod"]
    z0, noise = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    eps_hat = torch.randn_like(z0)
    calls = []
    out = purify_latent(lambda z, t: calls.append(int(t[0])) or eps_hat, z0, 250, noise, ac, full_ddim=False)
    a = ac[249]
    z_T = a.sqrt() * z0 + (1 - a).sqrt() * noise
    torch.testing.assert_close(out, (z_T - (1 - a).sqrt() * eps_hat) / a.sqrt())
    assert calls == [249]
    # With the true noise, one step recovers z0 exactly.
    torch.testing.assert_close(purify_latent(lambda z, t: noise, z0, 250, noise, ac, full_ddim=False), z0)


def test_ddim_purification_ends_at_alphabar_0():
    ac = schedule_buffers(ldm_betas())["alphas_cumprod"]
    z0, noise = torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.randn(1, 3, 4, 4, dtype=torch.float64)
    calls = []
    out = purify_latent(_point_mass_eps(z0, ac, calls), z0, 400, noise, ac, full_ddim=True)
    assert calls == latent_ddim_timesteps(20, 400)[::-1]
    # An exact ε keeps DDIM on the line √ᾱ z0 + √(1−ᾱ) n; the last step lands at ᾱ_0, not at ᾱ = 1.
    torch.testing.assert_close(out, ac[0].sqrt() * z0 + (1 - ac[0]).sqrt() * noise)
    calls.clear()
    purify_latent(_point_mass_eps(z0, ac, calls), z0, 7, noise, ac, full_ddim=True)
    assert calls == [6, 5, 4, 4, 3, 2, 1]  # S = min(T, 20) = 7 steps over 1 … 6, one repeated


def test_ddim_single_step_formula():
    ac = schedule_buffers(ldm_betas())["alphas_cumprod"]
    z, eps = torch.randn(1, 3, 2, 2, dtype=torch.float64), torch.randn(1, 3, 2, 2, dtype=torch.float64)
    out = ddim_sample(lambda x, t: eps, z, [1, 50], ac)
    # step 1: 50 -> 1, step 2: 1 -> 0; each z_prev = √a_prev (z − √(1−a) ε)/√a + √(1−a_prev) ε
    expected = z
    for t, t_prev in ((50, 1), (1, 0)):
        x0 = (expected - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
        expected = ac[t_prev].sqrt() * x0 + (1 - ac[t_prev]).sqrt() * eps
    torch.testing.assert_close(out, expected)


def test_purification_rejects_levels_outside_the_schedule():
    ac = schedule_buffers(ldm_betas())["alphas_cumprod"]
    z = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="T_k=0"):
        purify_latent(lambda x, t: x, z, 0, z, ac)
    with pytest.raises(ValueError, match="T_k=1001"):
        purify_latent(lambda x, t: x, z, 1001, z, ac)


# ------------------------------------------------------------------------------------------------
# LatentPrior (tiny random model)
# ------------------------------------------------------------------------------------------------

def test_latent_prior_latent_mode(tiny):
    prior = LatentPrior(TINY, "cpu", data_consistency_type="latent", model=tiny)
    assert prior.space == "latent"
    z = prior.init((2, 3, 32, 32), generators(0, 1))
    assert z.shape == (2, 3, 8, 8)
    torch.testing.assert_close(z[1:], torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(1)))
    z = z.clone().requires_grad_(True)
    image = prior.to_image(z)
    assert image.shape == (2, 3, 32, 32)
    image.square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # gradient through decoder and quantiser
    out = prior.purify(z.detach(), 44, generators(0, 1))
    assert out.shape == (2, 3, 8, 8) and not out.requires_grad and torch.isfinite(out).all()


def test_latent_prior_pixel_mode(tiny):
    prior = LatentPrior(TINY, "cpu", data_consistency_type="pixel", full_ddim=False, model=tiny)
    assert prior.space == "pixel" and prior.to_image is None
    x = prior.init((2, 3, 32, 32), generators(0, 1))
    assert x.shape == (2, 3, 32, 32) and not x.any()
    out = prior.purify(torch.rand(2, 3, 32, 32) * 2 - 1, 100, generators(0, 1))
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("full_ddim,T_k,expected", [(True, 400, 20), (True, 7, 7), (True, 1, 1), (False, 400, 1)])
def test_nfe_counts_unet_calls(tiny, full_ddim, T_k, expected):
    prior = LatentPrior(TINY, "cpu", data_consistency_type="latent", full_ddim=full_ddim, model=tiny)
    calls = []
    hook = tiny.model.diffusion_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        prior.purify(torch.zeros(1, 3, 8, 8), T_k, generators(0))
    finally:
        hook.remove()
    assert prior.nfe(T_k) == len(calls) == expected


def test_purification_depends_only_on_each_images_generator(tiny):
    prior = LatentPrior(TINY, "cpu", data_consistency_type="latent", model=tiny)
    z = torch.randn(3, 3, 8, 8)
    both = prior.purify(z, 60, generators(5, 6, 7))
    alone = prior.purify(z[1:2], 60, generators(6))
    torch.testing.assert_close(both[1:2], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prior.purify(z, 60, generators(5, 6, 7)), both)
    assert not torch.allclose(prior.purify(z, 60, generators(8, 6, 7))[0], both[0])


def test_latent_prior_rejects_bad_options(tiny):
    with pytest.raises(ValueError, match="data_consistency_type"):
        LatentPrior(TINY, "cpu", data_consistency_type="image", model=tiny)
    prior = LatentPrior(TINY, "cpu", data_consistency_type="latent", model=tiny)
    with pytest.raises(ValueError, match="multiple of 4"):
        prior.init((1, 3, 30, 32), generators(0))
    with pytest.raises(ValueError, match="need one generator per image"):
        prior.init((2, 3, 32, 32), generators(0))


def test_class_conditional_model_uses_its_label():
    torch.manual_seed(0)
    model = build_latent_model(TINY_CIN).eval()
    z, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 10])
    with torch.no_grad():
        eps_null = model.eps(z, t)
        model.config.class_label = 0
        eps_0 = model.eps(z, t)
    assert eps_null.shape == (2, 3, 8, 8)
    assert not torch.allclose(eps_null, eps_0)


# ------------------------------------------------------------------------------------------------
# Configuration errors
# ------------------------------------------------------------------------------------------------

def test_config_errors_name_the_key_and_the_valid_ones():
    with pytest.raises(ValueError, match="unknown key.*model_chanels.*valid keys"):
        parse_model_config({**TINY, "unet": {**TINY["unet"], "model_chanels": 8}})
    with pytest.raises(ValueError, match="unknown key.*ema.*valid keys"):
        parse_model_config({**TINY, "ema": True})
    with pytest.raises(ValueError, match="kind must be 'latent'"):
        parse_model_config({**TINY, "kind": "pixel"})
    with pytest.raises(ValueError, match=r"class_label must be an integer in \[0, 4\]"):
        parse_model_config({**TINY_CIN, "class_label": 5})
    with pytest.raises(ValueError, match="class_label is set"):
        parse_model_config({**TINY, "class_label": 3})
    assert parse_model_config({k: v for k, v in TINY.items() if k != "kind"}).model_path is None


# ------------------------------------------------------------------------------------------------
# Checkpoint loading
# ------------------------------------------------------------------------------------------------

class _Hparams:
    """A pickled non-tensor object, like Lightning's hyper-parameters; weights_only refuses it."""

    def __init__(self, lr):
        self.lr = lr


class _Evil:
    """Unpickling this would create a directory, if the loader ran pickled functions."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def _lightning_ckpt(model, *, ema: bool, first_stage: bool = True, extra: dict | None = None) -> tuple[dict, dict]:
    """A LatentDiffusion-style .ckpt dict and the EMA weights it holds (key -> tensor)."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if first_stage or not k.startswith("first_stage_model.")}
    sd.update({k: v.float() for k, v in model.schedule.items()})
    ema_weights = {}
    if ema:
        g = torch.Generator().manual_seed(1)
        for k, p in model.model.named_parameters():
            ema_weights["model." + k] = torch.randn(p.shape, generator=g)
            sd[ema_key("model." + k)] = ema_weights["model." + k]
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    return {"state_dict": sd, "global_step": 1234, "epoch": 3, **(extra or {})}, ema_weights


def test_lightning_ckpt_loads_strictly_with_ema_weights(tmp_path, tiny):
    target = tmp_path / "pwned"
    ckpt, ema = _lightning_ckpt(tiny, ema=True, extra={"hyper_parameters": _Hparams(1e-4), "callbacks": _Evil(str(target))})
    torch.save(ckpt, tmp_path / "model.ckpt")
    with pytest.raises(pickle.UnpicklingError):  # so the restricted fallback is what reads it
        torch.load(tmp_path / "model.ckpt", weights_only=True)
    model = load_latent_model({**TINY, "model_path": str(tmp_path / "model.ckpt")})
    assert not target.exists()  # the restricted unpickler never calls pickled functions
    sd = model.state_dict()
    for k, v in ema.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
    for k, v in tiny.first_stage_model.state_dict().items():
        torch.testing.assert_close(sd["first_stage_model." + k], v, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training

    raw = load_latent_model({**TINY, "model_path": str(tmp_path / "model.ckpt"), "use_ema": False})
    for k, v in tiny.model.state_dict().items():
        torch.testing.assert_close(raw.state_dict()["model." + k], v, rtol=0, atol=0)


def test_plain_state_dict_loads_and_warns_without_ema(tmp_path, tiny, caplog):
    torch.save(tiny.state_dict(), tmp_path / "plain.pt")
    with caplog.at_level(logging.WARNING):
        model = load_latent_model({**TINY, "model_path": str(tmp_path / "plain.pt")})
    assert "no model_ema" in caplog.text
    for k, v in tiny.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_first_stage_from_its_own_checkpoint_drops_training_losses(tmp_path, tiny):
    ldm, _ = _lightning_ckpt(tiny, ema=False, first_stage=False)
    torch.save(ldm, tmp_path / "ldm.ckpt")
    vq = {k: v.clone() for k, v in tiny.first_stage_model.state_dict().items()}
    vq["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    vq["loss.discriminator.main.3.num_batches_tracked"] = torch.tensor(5)
    torch.save({"state_dict": vq}, tmp_path / "vq.ckpt")
    config = {**TINY, "model_path": str(tmp_path / "ldm.ckpt"), "first_stage_path": str(tmp_path / "vq.ckpt")}
    model = load_latent_model(config)
    codebook = model.first_stage_model.quantize.embedding.weight
    torch.testing.assert_close(codebook, tiny.first_stage_model.quantize.embedding.weight)
    with pytest.raises(CheckpointError, match="has no first_stage_model.* weights; set first_stage_path"):
        load_latent_model({**config, "first_stage_path": None})


def test_checkpoint_errors_are_one_clear_line(tmp_path, tiny):
    missing = {**TINY, "model_path": str(tmp_path / "nowhere.ckpt"), "model_download": "https://example.org/ffhq.zip"}
    with pytest.raises(CheckpointError, match=r"nowhere\.ckpt' not found; download it from https://example.org/ffhq.zip"):
        load_latent_model(missing)

    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_latent_model({**TINY, "model_path": str(tmp_path / "garbage.ckpt")})

    ckpt, _ = _lightning_ckpt(tiny, ema=False)
    torch.save(ckpt, tmp_path / "model.ckpt")
    data = (tmp_path / "model.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])  # an interrupted download: the whole reason, one line
    with pytest.raises(CheckpointError) as err:
        load_latent_model({**TINY, "model_path": str(tmp_path / "cut.ckpt")})
    assert f"cut.ckpt': the file is truncated or damaged ({len(data) // 2:,} bytes): a torch zip archive" in str(err.value)
    assert "\n" not in str(err.value) and "re-download it from" in str(err.value)
    wider = {**TINY, "model_path": str(tmp_path / "model.ckpt"), "unet": {**TINY["unet"], "model_channels": 64}}
    with pytest.raises(CheckpointError, match="does not match the model config.*shape mismatches"):
        load_latent_model(wider)
    other_schedule = {**TINY, "model_path": str(tmp_path / "model.ckpt"), "diffusion": {"linear_end": 0.02}}
    with pytest.raises(CheckpointError, match="schedule buffer 'betas'"):
        load_latent_model(other_schedule)

    bad = copy.deepcopy(ckpt)
    bad["state_dict"]["first_stage_model.quantize.embedding.weight"] = torch.zeros(128, 8)
    torch.save(bad, tmp_path / "f16.ckpt")
    with pytest.raises(CheckpointError, match="vq-f16"):
        load_latent_model({**TINY, "model_path": str(tmp_path / "f16.ckpt")})

    partial_ema, _ = _lightning_ckpt(tiny, ema=True)
    del partial_ema["state_dict"][ema_key("model.diffusion_model.out.2.weight")]
    torch.save(partial_ema, tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match="EMA weights do not match"):
        load_latent_model({**TINY, "model_path": str(tmp_path / "partial.ckpt")})
