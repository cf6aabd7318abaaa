"""guided-diffusion UNet: golden outputs, checkpoint layouts, attention, gradients, errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from guided_diffusion import unet
from util.checkpoints import CheckpointError
from guided_diffusion.unet import AttentionBlock, create_model, timestep_embedding

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
MANIFESTS = ROOT / "models" / "manifests"
SHIPPED = {
    "model_config_ffhq.yaml": "ffhq_10m.json",
    "model_config_ImageNet.yaml": "imagenet_256.json",
    "model_config_lsun_bedroom.yaml": "lsun_bedroom.json",
}
# A small model with every kind of block: 3 levels, attention at 8 px (legacy order), up/down ResBlocks.
TINY = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2,2",
    attention_resolutions="8",
    num_head_channels=16,
    model_path=None,
)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter (ADM zero-initialises several layers, which would hide them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            std = 0.1 if p.ndim == 1 else fan_in ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def tiny(seed: int = 0, **overrides) -> torch.nn.Module:
    return randomise(create_model(**{**TINY, **overrides}), seed)


def inputs(b: int = 2, h: int = 32, w: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g), torch.tensor([3, 871][:b])


# --- golden -----------------------------------------------------------------------------------------

def test_golden_unet_a() -> None:
    cfg = json.loads((GOLDEN / "unet_a.json").read_text())["create_model_kwargs"]
    model = create_model(**cfg, model_path=str(GOLDEN / "unet_a.pt"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    g = np.load(GOLDEN / "unet_a.npz")
    with torch.no_grad():
        for x, t, y in [("x1", "t1", "y1"), ("x2", "t2", "y2")]:
            out = model(torch.from_numpy(g[x]), torch.from_numpy(g[t]))
            assert out.shape == g[y].shape
            assert (out - torch.from_numpy(g[y])).abs().max().item() < 1e-4, y
    emb = timestep_embedding(torch.from_numpy(g["t1"]), cfg["num_channels"])
    assert (emb - torch.from_numpy(g["t1_sinusoidal"])).abs().max().item() < 1e-4


# --- shipped configurations match the public checkpoints' layouts ----------------------------------

@pytest.mark.parametrize("config_file,manifest_file", SHIPPED.items())
def test_shipped_config_matches_manifest(config_file: str, manifest_file: str) -> None:
    config = yaml.safe_load((ROOT / "model_configurations" / config_file).read_text())
    manifest = json.loads((MANIFESTS / manifest_file).read_text())
    assert config["model_path"].endswith(manifest["checkpoint"])
    config["model_path"] = None
    with torch.device("meta"):
        model = create_model(**config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: shape for k, shape in manifest["state_dict"]}
    assert list(shapes) == [k for k, _ in manifest["state_dict"]]  # registration order too
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]


def test_num_head_channels_overrides_num_heads() -> None:
    config = yaml.safe_load((ROOT / "model_configurations" / "model_config_ffhq.yaml").read_text())
    with torch.device("meta"):
        model = create_model(**{**config, "model_path": None})
    heads = {m.num_heads for m in model.modules() if isinstance(m, AttentionBlock)}
    assert heads == {512 // 64}


# --- attention -------------------------------------------------------------------------------------

def explicit_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's AttentionBlock written out: Conv1d qkv, scaled einsum, float32 softmax."""
    b, c, h, w = x.shape
    heads, ch = block.num_heads, c // block.num_heads
    xf = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(xf))  # (B, 3C, T)
    if block.legacy_order:
        q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    else:
        q, k, v = (z.reshape(b * heads, ch, -1) for z in qkv.chunk(3, dim=1))
    scale = 1 / ch ** 0.25
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1).type(q.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    return (xf + block.proj_out(a)).reshape(b, c, h, w)


@pytest.mark.parametrize("legacy_order", [True, False])
def test_sdpa_attention_equals_explicit(legacy_order: bool) -> None:
    block = randomise(AttentionBlock(64, num_head_channels=16, legacy_order=legacy_order), seed=3)
    x = torch.randn(2, 64, 6, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out, ref = block(x), explicit_attention(block, x)
        other = AttentionBlock(64, num_head_channels=16, legacy_order=not legacy_order)
        other.load_state_dict(block.state_dict())
        swapped = other(x)
    assert (out - ref).abs().max().item() < 1e-5
    assert (swapped - ref).abs().max().item() > 1e-2  # the QKV order matters


def test_attention_bfloat16_autocast_close_to_float32() -> None:
    block = randomise(AttentionBlock(64, num_head_channels=32), seed=5)
    x = torch.randn(1, 64, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = explicit_attention(block, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
    assert out.dtype == torch.bfloat16 or out.dtype == torch.float32
    assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


# --- forward behaviour -----------------------------------------------------------------------------

def test_fresh_model_outputs_zeros_as_adm() -> None:
    x, t = inputs()
    with torch.no_grad():
        assert torch.count_nonzero(create_model(**TINY)(x, t)) == 0


def test_learn_sigma_false_gives_three_channels() -> None:
    x, t = inputs(h=32, w=64)
    with torch.no_grad():
        assert tiny(learn_sigma=False)(x, t).shape == (2, 3, 32, 64)
        assert tiny()(x, t).shape == (2, 6, 32, 64)


def test_channels_last_gives_same_output() -> None:
    model, (x, t) = tiny(), inputs()
    with torch.no_grad():
        ref = model(x, t)
        out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t)
    assert (out - ref).abs().max().item() < 1e-5


def test_scalar_timestep_broadcasts() -> None:
    model, (x, _) = tiny(), inputs()
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor(500)), model(x, torch.tensor([500, 500])))


def test_timestep_changes_output() -> None:
    model, (x, _) = tiny(), inputs(b=1)
    with torch.no_grad():
        assert (model(x, torch.tensor([10])) - model(x, torch.tensor([900]))).abs().max() > 1e-3


def test_gradient_wrt_input_with_frozen_weights() -> None:
    grads = []
    for use_checkpoint in (False, True):
        model = tiny(use_checkpoint=use_checkpoint).requires_grad_(False)
        x, t = inputs()
        x.requires_grad_(True)
        model(x, t)[:, :3].square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.parameters())
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_class_cond_uses_labels() -> None:
    model = tiny(class_cond=True)
    assert model.label_emb.weight.shape == (1000, 128)
    x, t = inputs()
    with torch.no_grad():
        a, b = model(x, t, y=torch.tensor([1, 2])), model(x, t, y=torch.tensor([7, 2]))
    assert (a[0] - b[0]).abs().max() > 1e-4 and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="class_cond"):
        model(x, t)


def test_input_size_not_divisible() -> None:
    x, t = inputs(h=32, w=30)
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny()(x, t)


# --- configuration parsing -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "image_size,levels", [(256, (1, 1, 2, 2, 4, 4)), (128, (1, 1, 2, 3, 4)), (64, (1, 2, 3, 4)), (32, (1, 2, 2, 2))]
)
def test_default_channel_mult(image_size: int, levels: tuple) -> None:
    assert unet.parse_channel_mult("", image_size) == levels
    assert unet.parse_channel_mult("1,2,2", image_size) == unet.parse_channel_mult([1, 2, 2], image_size) == (1, 2, 2)


def test_attention_resolutions_forms_agree() -> None:
    assert unet.parse_attention_resolutions(16, 256) == (16,)
    assert unet.parse_attention_resolutions("32,16,8", 256) == unet.parse_attention_resolutions([32, 16, 8], 256) == (8, 16, 32)
    assert unet.parse_attention_resolutions("", 256) == ()
    keys = lambda res: list(create_model(**{**TINY, "attention_resolutions": res}).state_dict())
    assert keys(8) == keys("8") == keys([8]) != keys("16,8")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_chanels=64), "unknown key.*num_chanels.*valid keys are.*num_channels"),
        (dict(image_size=48, channel_mult=""), "no default channel_mult for image_size=48"),
        (dict(channel_mult="1,x"), "channel_mult='1,x'"),
        (dict(attention_resolutions="7"), r"attention_resolutions \[7\]"),
        (dict(num_channels=48), "multiple of 32"),
        (dict(num_head_channels=24), "num_head_channels=24"),
    ],
)
def test_bad_config(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model(**{**TINY, **change})


# --- checkpoints -----------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_imagenet_alias(tmp_path: Path) -> None:
    model, (x, t) = tiny(seed=7), inputs()
    torch.save(model.state_dict(), tmp_path / "imagenet256.pt")
    loaded = create_model(**{**TINY, "model_path": str(tmp_path / "imagenet_256.pt")})  # other spelling
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))


def test_missing_checkpoint_names_file_and_download_page(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"ffhq_10m\.pt.*DPS2022/diffusion-posterior-sampling"):
        create_model(**{**TINY, "model_path": str(tmp_path / "ffhq_10m.pt")})
    with pytest.raises(CheckpointError, match=r"lsun_bedroom\.pt.*openai/guided-diffusion"):
        create_model(**{**TINY, "model_path": str(tmp_path / "lsun_bedroom.pt")})
    with pytest.raises(CheckpointError, match=r"mine\.pt.*the place you got it from"):
        create_model(**{**TINY, "model_path": str(tmp_path / "mine.pt")})


def test_mismatched_checkpoint_fails_loudly(tmp_path: Path) -> None:
    sd = create_model(**TINY).state_dict()
    renamed = dict(sd)
    renamed["out.2.weight_typo"] = renamed.pop("out.2.weight")
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match=r"renamed\.pt.*missing keys.*out\.2\.weight.*unexpected keys.*weight_typo"):
        create_model(**{**TINY, "model_path": str(tmp_path / "renamed.pt")})
    wrong = dict(sd)
    wrong["time_embed.0.weight"] = torch.zeros(128, 64)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*time_embed\.0\.weight \(128, 64\) != \(128, 32\)"):
        create_model(**{**TINY, "model_path": str(tmp_path / "wrong.pt")})


def test_relative_model_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert unet.resolve_model_path("models/ffhq_10m.pt") == os.path.abspath("models/ffhq_10m.pt")  # missing: as given
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "ffhq_10m.pt").touch()
    assert unet.resolve_model_path("models/ffhq_10m.pt") == str(tmp_path / "models" / "ffhq_10m.pt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unet_traces_as_one_graph_for_torch_compile(dtype):
    """torch.compile(fullgraph=True) must see the whole network (no graph breaks), channels-last and under
    autocast, as the fast path compiles it on CUDA; AOTAutograd's trace gives the eager result."""
    from tests.test_driver import TINY_UNET

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model(**TINY_UNET).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model = model.to(memory_format=torch.channels_last)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([500, 3])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out, ref = compiled(x, t).float(), model(x, t).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out - ref).abs().max().item() <= tol * ref.abs().max().item()
