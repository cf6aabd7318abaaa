"""bkse KernelWizard and the nonlinear_blur operator: manifest keys, golden numbers, operator contract."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import bkse.loader as loader
from bkse.kernel_wizard import KernelWizard
from util.errors import ConfigError
from bkse.loader import load_kernel_wizard, load_options
from bkse.operator import NonlinearBlurOperator
from util.checkpoints import CheckpointError, load_strict
from guided_diffusion.measurements import get_operator

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
MANIFEST = ROOT / "models" / "manifests" / "GOPRO_wVAE.json"
DEFAULT_YML = ROOT / "bkse" / "options" / "generate_blur" / "default.yml"


def write_options(tmp_path: Path, name: str = "kw.yml", **changes) -> Path:
    """A copy of default.yml's KernelWizard section with `changes` applied."""
    doc = yaml.safe_load(DEFAULT_YML.read_text())
    doc["KernelWizard"].update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def golden():
    z = np.load(GOLDEN / "kernelwizard_a.npz")
    meta = json.loads((GOLDEN / "kernelwizard_a.json").read_text())
    sd = torch.load(GOLDEN / "kernelwizard_a.pt", map_location="cpu", weights_only=True)
    return {k: torch.from_numpy(z[k]) for k in z.files}, meta["options"], sd


@pytest.fixture()
def tiny_op(tmp_path):
    """A reduced random network (nf 8): kernel (1, 64, H/128, W/128)."""
    return NonlinearBlurOperator(str(write_options(tmp_path, nf=8, front_RBs=1, back_RBs=1, pretrained=None)))


# ---- architecture ------------------------------------------------------------------------------

def test_full_network_matches_manifest_keys_and_shapes():
    manifest = json.loads(MANIFEST.read_text())
    with torch.device("meta"):
        model = KernelWizard(load_options(DEFAULT_YML))
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == manifest["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"] == 115_265_475
    assert list(model.buffers()) == []


def test_default_options_equal_the_manifest_config():
    manifest = json.loads(MANIFEST.read_text())
    assert load_options(DEFAULT_YML) == manifest["config"]
    assert manifest["config"]["pretrained"] == "bkse/experiments/pretrained/GOPRO_wVAE.pth"


def test_kernel_extractor_forward_shapes():
    opt = load_options(DEFAULT_YML) | {"nf": 4, "kernel_dim": 8, "front_RBs": 1, "back_RBs": 1}
    torch.manual_seed(0)
    model = KernelWizard(opt).eval()
    sharp, blur = torch.rand(2, 3, 256, 384), torch.rand(2, 3, 256, 384)
    with torch.no_grad():
        mu, logvar = model(sharp, blur)
    assert mu.shape == logvar.shape == (2, 8, 2, 3)
    assert not torch.equal(mu, logvar)
    with pytest.raises(RuntimeError, match="with_kernel_extractor"):
        KernelWizard(opt, with_kernel_extractor=False)(sharp, blur)


# ---- golden ------------------------------------------------------------------------------------

def test_adapt_kernel_matches_golden(golden):
    arrays, options, sd = golden
    model = KernelWizard(options, with_kernel_extractor=False)
    load_strict(model, sd, what="golden", path="kernelwizard_a.pt", source="tests/golden")
    with torch.no_grad():
        b = model.eval().adaptKernel(arrays["u"], arrays["kernel"])
    assert (b - arrays["b"]).abs().max().item() < 1e-4
    with torch.no_grad():  # the kernel matters (golden README: up to 0.315 with a zero kernel)
        b0 = model.adaptKernel(arrays["u"], torch.zeros_like(arrays["kernel"]))
    assert (b0 - arrays["b"]).abs().max().item() > 0.1


def test_operator_matches_golden(golden, tmp_path):
    arrays, options, sd = golden
    opt_yml = write_options(tmp_path, **{k: options[k] for k in ("nf", "front_RBs", "back_RBs")}, pretrained=None)
    op = get_operator("nonlinear_blur", opt_yml_path=str(opt_yml), device="cpu")
    load_strict(op.model, sd, what="golden", path="kernelwizard_a.pt", source="tests/golden")
    with torch.no_grad():
        y = op.forward(2 * arrays["u"] - 1, kernel=arrays["kernel"])
    assert (y - arrays["nlblur"]).abs().max().item() < 1e-4
    assert y.min() >= -1 and y.max() <= 1


# ---- loading -----------------------------------------------------------------------------------

def test_missing_checkpoint_fails_before_building(tmp_path, monkeypatch):
    opt_yml = write_options(tmp_path, pretrained="nowhere/GOPRO_wVAE.pth")

    def no_build(*args, **kwargs):
        raise AssertionError("the network was built before the checkpoint was found")

    monkeypatch.setattr(loader, "KernelWizard", no_build)
    with pytest.raises(CheckpointError) as info:
        NonlinearBlurOperator(str(opt_yml))
    msg = str(info.value)
    assert "\n" not in msg
    assert "nowhere/GOPRO_wVAE.pth" in msg and str(opt_yml) in msg
    assert "github.com/VinAIResearch/blur-kernel-space-exploring" in msg


def test_default_options_point_at_the_documented_place():
    if (ROOT / "bkse/experiments/pretrained/GOPRO_wVAE.pth").is_file():
        pytest.skip("GOPRO_wVAE.pth is installed")
    with pytest.raises(CheckpointError, match="bkse/experiments/pretrained/GOPRO_wVAE.pth"):
        get_operator("nonlinear_blur", opt_yml_path="./bkse/options/generate_blur/default.yml")


def test_adapt_only_checkpoint_still_needs_every_key(golden, tmp_path):
    _, options, sd = golden  # the golden file omits the 14 kernel_extractor keys
    torch.save(sd, tmp_path / "partial.pth")
    opt_yml = write_options(tmp_path, nf=options["nf"], front_RBs=options["front_RBs"], back_RBs=options["back_RBs"],
                            pretrained=str(tmp_path / "partial.pth"))
    with pytest.raises(CheckpointError, match="14 missing keys .*kernel_extractor"):
        load_kernel_wizard(opt_yml, adapt_only=True)


def test_full_checkpoint_loads_strictly(tmp_path):
    small = {"nf": 4, "kernel_dim": 8, "front_RBs": 1, "back_RBs": 1}
    torch.manual_seed(1)
    saved = KernelWizard(load_options(DEFAULT_YML) | small).state_dict()
    torch.save({"module." + k: v for k, v in saved.items()}, tmp_path / "kw.pth")  # DataParallel prefix
    opt_yml = write_options(tmp_path, **small, pretrained=str(tmp_path / "kw.pth"))
    adapt = load_kernel_wizard(opt_yml, adapt_only=True)
    full = load_kernel_wizard(opt_yml, adapt_only=False)
    assert not adapt.random_weights and not hasattr(adapt, "kernel_extractor") and not adapt.training
    assert all(not p.requires_grad for p in full.parameters())
    for model in (adapt, full):
        for k, v in model.state_dict().items():
            assert torch.equal(v, saved[k]), k
    assert len(full.state_dict()) == len(saved)
    bad = dict(saved, **{"recon_trunk.0.conv1.bias": torch.zeros(5)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_kernel_wizard(write_options(tmp_path, "bad.yml", **small, pretrained=str(tmp_path / "bad.pth")))


def test_random_weights_are_seeded_and_leave_the_global_rng_alone(tmp_path):
    opt_yml = write_options(tmp_path, nf=8, front_RBs=1, back_RBs=1, pretrained=None)
    state = torch.get_rng_state()
    a, b = load_kernel_wizard(opt_yml), load_kernel_wizard(opt_yml)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.random_weights
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_options_resolve_against_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_options("bkse/options/generate_blur/random_small.yml")["pretrained"] is None
    with pytest.raises(ConfigError, match="missing.yml' not found; set opt_yml_path"):
        load_options("bkse/options/generate_blur/missing.yml")


@pytest.mark.parametrize("change, match", [
    ({"nf_typo": 3}, "unknown key"),
    ({"Adapter": {"norm": "batch", "use_dropout": False}}, "norm"),
    ({"nf": 0}, "nf"),
])
def test_bad_options_are_rejected(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        load_options(write_options(tmp_path, **change))


# ---- operator ----------------------------------------------------------------------------------

def test_operator_contract(tiny_op):
    assert tiny_op.is_linear is False and tiny_op.random_weights and tiny_op.saved_state() == {}
    state = tiny_op.draw_state(torch.Generator().manual_seed(5), (3, 128, 256))
    assert set(state) == {"kernel"} and state["kernel"].shape == (1, 64, 1, 2)
    expected = 1.2 * torch.randn((1, 64, 1, 2), generator=torch.Generator().manual_seed(5))
    assert torch.equal(state["kernel"], expected)
    with pytest.raises(NotImplementedError):
        tiny_op.transpose(torch.zeros(1, 3, 128, 256))


def test_operator_is_deterministic_and_reuses_the_kernel(tiny_op, tmp_path):
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    state = tiny_op.draw_state(torch.Generator().manual_seed(0), x.shape)
    rng = torch.get_rng_state()
    with torch.no_grad():
        y = tiny_op(x, **state)
        assert torch.equal(tiny_op(x, **state), y)  # later calls: same kernel, no hidden draws
    assert torch.equal(torch.get_rng_state(), rng)
    again_yml = write_options(tmp_path, "again.yml", nf=8, front_RBs=1, back_RBs=1, pretrained=None)
    other = NonlinearBlurOperator(str(again_yml))
    again = other.draw_state(torch.Generator().manual_seed(0), x.shape)
    with torch.no_grad():
        assert torch.equal(other(x, **again), y)
        new = tiny_op(x, **tiny_op.draw_state(torch.Generator().manual_seed(1), x.shape))
    assert (new - y).abs().max() > 1e-4  # a different kernel gives a different measurement
    with pytest.raises(ValueError, match="kernel"):
        tiny_op(x)


def test_operator_gradients_reach_x(tiny_op):
    x = (torch.rand(1, 3, 128, 128) * 2 - 1).requires_grad_(True)
    state = tiny_op.draw_state(torch.Generator().manual_seed(2), x.shape)
    y = torch.rand(1, 3, 128, 128) * 2 - 1
    torch.nn.functional.mse_loss(tiny_op(x, **state), y).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_op.model.parameters())


def test_channels_last_gives_the_same_blur_and_gradient(tiny_op):
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(4)) * 2 - 1
    state = tiny_op.draw_state(torch.Generator().manual_seed(5), x.shape[1:])
    results = []
    for make_channels_last in (False, True):
        if make_channels_last:
            tiny_op.channels_last()
        xx = x.clone().requires_grad_(True)
        y = tiny_op(xx, **state)
        y.square().mean().backward()
        results.append((y.detach(), xx.grad))
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in tiny_op.model.parameters() if p.dim() == 4)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-9)


def test_batch_of_two_equals_two_singles(tiny_op):
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    states = [tiny_op.draw_state(torch.Generator().manual_seed(s), (3, 128, 128)) for s in (10, 11)]
    kernel = torch.cat([s["kernel"] for s in states])
    with torch.no_grad():
        batch = tiny_op(x, kernel=kernel)
        singles = torch.cat([tiny_op(x[i:i + 1], **states[i]) for i in range(2)])
    assert (batch - singles).abs().max() < 1e-5
    assert (batch[0] - batch[1]).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(1, 3, 100, 128), (1, 3, 128, 192)])
def test_wrong_image_size_is_rejected(tiny_op, shape):
    kernel = torch.zeros(1, 64, 1, 1)
    with pytest.raises(ValueError, match="multiple of 128"):
        tiny_op(torch.zeros(shape), kernel=kernel)
    with pytest.raises(ValueError, match="multiple of 128"):
        tiny_op.draw_state(torch.Generator().manual_seed(0), shape)


def test_wrong_kernel_shape_is_rejected(tiny_op):
    with pytest.raises(ValueError, match=r"\(B, 64, 1, 1\)"):
        tiny_op(torch.zeros(1, 3, 128, 128), kernel=torch.zeros(1, 512, 1, 1))
