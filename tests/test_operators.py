"""Forward operators and measurement noise: goldens, adjointness, batching, randomness, bad inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from guided_diffusion.measurements import (
    BlurOperator,
    MotionBlurOperator,
    __OPERATORS__,
    get_noise,
    get_operator,
)
from motionblur import motion_kernel
from util.fft import fft2c, ifft2c, reflect_pad_adjoint
from util.resizer import imresize_matrix

GOLDEN = Path(__file__).parent / "golden" / "operators_a.npz"

# Small, odd-sized settings for every linear operator (SR needs sizes divisible by its factor).
LINEAR_CASES = {
    "noise": ({}, (67, 71)),
    "super_resolution": ({"in_shape": (1, 3, 256, 256), "scale_factor": 4}, (68, 72)),
    "gaussian_blur": ({"kernel_size": 61, "intensity": 3.0}, (67, 71)),
    "motion_blur": ({"kernel_size": 61, "intensity": 0.5, "seed": 3}, (67, 71)),
    "inpainting": ({"mask_opt": {"mask_type": "random", "mask_prob_range": (0.3, 0.7)}}, (67, 71)),
}
NONLINEAR_CASES = {"phase_retrieval": ({"oversample": 2.0}, (67, 71))}
SKIPPED = {"nonlinear_blur"}  # needs a KernelWizard checkpoint; tested in the bkse tests


@pytest.fixture(scope="module")
def golden():
    return {k: torch.from_numpy(v) for k, v in np.load(GOLDEN).items()}


def _inner(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def _state(op, shape, seed=0, batch=1):
    """Per-image state for a batch, each image from its own generator (as the driver does)."""
    states = [op.draw_state(torch.Generator().manual_seed(seed + b), shape) for b in range(batch)]
    return {k: torch.cat([s[k] for s in states]) for k in states[0]} if states[0] else {}


def test_every_registered_operator_is_covered():
    assert set(__OPERATORS__) - SKIPPED == set(LINEAR_CASES) | set(NONLINEAR_CASES)
    for name in LINEAR_CASES:
        assert __OPERATORS__[name].is_linear
    assert not __OPERATORS__["phase_retrieval"].is_linear


# ---- goldens (tests/golden/README.md §2) ----

def test_super_resolution_golden(golden):
    matrix = imresize_matrix(256, 0.25)
    assert matrix.shape == (64, 256)
    assert np.array_equal(matrix.astype(np.float32), golden["sr4_matrix"].numpy())
    op = get_operator("super_resolution", in_shape=(1, 3, 256, 256), scale_factor=4)
    assert (op(golden["x"]) - golden["sr4"]).abs().max() < 1e-5


def test_gaussian_blur_golden(golden):
    op = get_operator("gaussian_blur", kernel_size=61, intensity=3.0)
    assert torch.equal(op.kernel, golden["gblur_kernel"])
    assert torch.equal(op.saved_state()["kernel"], golden["gblur_kernel"])
    assert (op(golden["x"]) - golden["gblur"]).abs().max() < 1e-5


def test_motion_blur_golden_from_kernel(golden):
    op = MotionBlurOperator.from_kernel(golden["mblur_kernel"])
    assert isinstance(op, MotionBlurOperator) and op.is_linear
    assert (op(golden["x"]) - golden["mblur"]).abs().max() < 1e-5
    assert torch.equal(op.saved_state()["kernel"], golden["mblur_kernel"])


def test_motion_kernel_reproduces_upstream_draws(golden):
    # Upstream draws two kernels from numpy's global RNG seeded 0 and keeps the second; our
    # generator consumes the same draws in the same order from a RandomState.
    rng = np.random.RandomState(0)
    motion_kernel(61, 0.5, rng)
    assert np.array_equal(motion_kernel(61, 0.5, rng), golden["mblur_kernel"].numpy())


def test_inpainting_golden(golden):
    op = get_operator("inpainting")  # the official fixed 100×100 hole
    mask = op.draw_state(torch.Generator(), (3, 256, 256))["mask"]
    assert torch.equal(mask, golden["mask"])
    assert torch.equal(op(golden["x"]), golden["inpaint"])
    assert torch.equal(op(golden["x"], mask=mask), golden["inpaint"])


def test_phase_retrieval_golden(golden):
    op = get_operator("phase_retrieval", oversample=2.0)
    y = op(golden["x"])
    assert y.shape == (1, 3, 384, 384)
    assert (y - golden["pr"]).abs().max() < 1e-4


# ---- linear algebra ----

@pytest.mark.parametrize("name", sorted(LINEAR_CASES))
def test_adjoint_float64(name):
    params, (h, w) = LINEAR_CASES[name]
    op = get_operator(name, **params)
    state = {k: v.double() for k, v in _state(op, (3, h, w), batch=2).items()}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, h, w, generator=gen, dtype=torch.float64)
    ax = op.forward(x, **state)
    y = torch.randn(ax.shape, generator=gen, dtype=torch.float64)
    aty = op.transpose(y, **state)
    assert aty.shape == x.shape and aty.dtype == torch.float64
    lhs, rhs = _inner(ax, y), _inner(x, aty)
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("name", sorted(LINEAR_CASES))
def test_autograd_gradient_matches_transpose(name):
    # The solver differentiates forward: ∇_x ½‖Ax‖² must equal Aᵀ A x.
    params, (h, w) = LINEAR_CASES[name]
    op = get_operator(name, **params)
    state = {k: v.double() for k, v in _state(op, (3, h, w)).items()}
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x.requires_grad_(True)
    (0.5 * op.forward(x, **state).square().sum()).backward()
    expected = op.transpose(op.forward(x.detach(), **state), **state)
    assert torch.allclose(x.grad, expected, atol=1e-10)


def test_fft_blur_equals_direct_correlation():
    gen = torch.Generator().manual_seed(4)
    kernel = torch.rand(5, 7, generator=gen, dtype=torch.float64)  # asymmetric: catches a flip
    x = torch.randn(2, 3, 13, 17, generator=gen, dtype=torch.float64)
    op = BlurOperator.from_kernel(kernel)
    weight = kernel.expand(3, 1, 5, 7)
    reference = F.conv2d(F.pad(x, (3, 3, 2, 2), mode="reflect"), weight, groups=3)
    assert torch.allclose(op(x), reference, atol=1e-12)


def test_reflect_pad_adjoint_matches_autograd():
    z_shape = (2, 3, 9 + 2 * 4, 6 + 2 * 5)
    x = torch.randn(2, 3, 9, 6, dtype=torch.float64, requires_grad=True)
    z = torch.randn(z_shape, dtype=torch.float64)
    (F.pad(x, (5, 5, 4, 4), mode="reflect") * z).sum().backward()
    assert torch.allclose(reflect_pad_adjoint(z, 4, 5), x.grad, atol=1e-12)


def test_blur_works_at_the_reflect_limit_and_rejects_smaller_images():
    op = get_operator("gaussian_blur", kernel_size=61, intensity=3.0)
    assert op(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    assert op(torch.ones(1, 3, 31, 40)).sub(1).abs().max() < 1e-5  # pad 30 < 31: a constant stays constant
    with pytest.raises(ValueError, match="too small.*kernel_size"):
        op(torch.zeros(1, 3, 30, 64))


def test_imresize_matrix_formulas():
    assert np.allclose(imresize_matrix(9, 1.0), np.eye(9))
    m = imresize_matrix(50, 0.5)
    assert m.shape == (25, 50) and np.allclose(m.sum(axis=1), 1.0)
    # Interior row i is the stretched cubic centred at 2i + 0.5: symmetric about that point.
    assert np.allclose(m[10, 14:21], m[10, 27:20:-1])
    assert imresize_matrix(10, 0.3).shape == (3, 10)  # ceil(10 · 0.3)


def test_fft2c_is_centred_and_orthonormal():
    x = torch.randn(2, 3, 8, 10, dtype=torch.float64)
    z = fft2c(x)
    assert torch.allclose(z.abs().square().sum(), x.square().sum())  # Parseval
    assert torch.allclose(ifft2c(z).real, x) and ifft2c(z).imag.abs().max() < 1e-12
    delta = torch.zeros(8, 10, dtype=torch.float64)
    delta[4, 5] = 1.0  # the centre pixel: a flat spectrum with zero phase
    assert torch.allclose(fft2c(delta), torch.full((8, 10), 1 / np.sqrt(80), dtype=torch.complex128))


# ---- shapes, batching, sizes ----

@pytest.mark.parametrize("name", sorted(LINEAR_CASES) + sorted(NONLINEAR_CASES))
def test_batched_equals_per_image(name):
    params, (h, w) = {**LINEAR_CASES, **NONLINEAR_CASES}[name]
    op = get_operator(name, **params)
    state = _state(op, (3, h, w), batch=3)
    x = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(5))
    batched = op(x, **state)
    for b in range(3):
        single = op(x[b:b + 1], **{k: v[b:b + 1] for k, v in state.items()})
        assert torch.allclose(batched[b:b + 1], single, atol=1e-6)


def test_output_shapes_other_sizes():
    x = torch.randn(2, 3, 64, 96)
    assert get_operator("super_resolution", in_shape=(1, 3, 256, 256), scale_factor=4)(x).shape == (2, 3, 16, 24)
    assert get_operator("phase_retrieval", oversample=2.0)(x).shape == (2, 3, 64 + 32, 96 + 48)
    assert get_operator("motion_blur", kernel_size=61, intensity=0.5)(x).shape == x.shape
    assert get_operator("inpainting")(x).shape == x.shape


def test_phase_retrieval_gradient_is_finite_at_zero():
    x = torch.zeros(1, 3, 16, 16, requires_grad=True)
    get_operator("phase_retrieval", oversample=2.0)(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad) == 0


def test_super_resolution_sizes():
    op = get_operator("super_resolution", scale_factor=2)
    assert op.transpose(torch.zeros(1, 3, 5, 7)).shape == (1, 3, 10, 14)
    with pytest.raises(ValueError, match="not divisible by scale_factor 2"):
        op(torch.zeros(1, 3, 11, 14))


# ---- motion kernels ----

def test_motion_kernel_generator():
    a = motion_kernel(31, 0.5, np.random.default_rng(7))
    b = motion_kernel(31, 0.5, np.random.default_rng(7))
    c = motion_kernel(31, 0.5, np.random.default_rng(8))
    assert a.shape == (31, 31) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0 and abs(a.sum() - 1) < 1e-5
    straight = motion_kernel(21, 0.0, np.random.default_rng(0))
    assert abs(straight.sum() - 1) < 1e-5


def test_motion_blur_operator_seed():
    k0 = get_operator("motion_blur", kernel_size=61, intensity=0.5).saved_state()["kernel"]
    k0b = get_operator("motion_blur", kernel_size=61, intensity=0.5, seed=0).saved_state()["kernel"]
    k1 = get_operator("motion_blur", kernel_size=61, intensity=0.5, seed=1).saved_state()["kernel"]
    assert k0.shape == (61, 61) and torch.equal(k0, k0b) and not torch.equal(k0, k1)
    assert torch.equal(k0, torch.from_numpy(motion_kernel(61, 0.5, np.random.default_rng(0))))


# ---- inpainting masks ----

def test_random_mask_per_generator():
    op = get_operator("inpainting", mask_opt={"mask_type": "random", "mask_prob_range": (0.3, 0.7),
                                               "image_size": 256})
    draw = lambda seed: op.draw_state(torch.Generator().manual_seed(seed), (3, 64, 48))["mask"]
    m0, m0b, m1 = draw(0), draw(0), draw(1)
    assert m0.shape == (1, 3, 64, 48) and torch.equal(m0, m0b) and not torch.equal(m0, m1)
    assert torch.equal(m0[:, 0], m0[:, 1]) and torch.equal(m0[:, 0], m0[:, 2])
    assert set(m0.unique().tolist()) <= {0.0, 1.0}
    for m in (m0, m1):
        assert 0.3 <= 1 - float(m.mean()) <= 0.7
    with pytest.raises(ValueError, match="draws a mask per image"):
        op(torch.zeros(1, 3, 64, 48))


def test_box_masks():
    fixed = get_operator("inpainting", mask_opt={"mask_type": "box", "box": [2, 3, 4, 5]})
    mask = fixed.draw_state(torch.Generator(), (3, 10, 12))["mask"][0, 0]
    expected = torch.ones(10, 12)
    expected[2:6, 3:8] = 0
    assert torch.equal(mask, expected)
    official = get_operator("inpainting").draw_state(torch.Generator(), (3, 64, 64))["mask"][0, 0]
    assert torch.equal(official[25:50, 25:50], torch.zeros(25, 25)) and float(official.sum()) == 64 * 64 - 625
    rand = get_operator("inpainting", mask_opt={"mask_type": "box", "mask_len_range": (8, 12), "margin": (4, 4)})
    draw = lambda seed: rand.draw_state(torch.Generator().manual_seed(seed), (3, 40, 40))["mask"][0, 0]
    a = draw(3)
    assert torch.equal(a, draw(3))
    holes = (a == 0).nonzero()
    size = holes.max(0).values - holes.min(0).values + 1
    assert ((size >= 8) & (size < 12)).all() and int((a == 0).sum()) == int(size.prod())
    assert holes.min() >= 4 and holes.max() < 36


def test_file_mask(tmp_path):
    picture = np.full((20, 20), 255, dtype=np.uint8)
    picture[:10, :] = 0  # top half missing
    Image.fromarray(picture).save(tmp_path / "mask.png")
    op = get_operator("inpainting", mask_opt={"mask_type": "file", "path": str(tmp_path / "mask.png")})
    mask = op.draw_state(torch.Generator(), (3, 40, 30))["mask"]
    assert mask.shape == (1, 3, 40, 30)
    assert float(mask[..., :20, :].max()) == 0 and float(mask[..., 20:, :].min()) == 1
    (tmp_path / "bad.png").write_text("not an image")
    for path in ("bad.png", "missing.png"):
        with pytest.raises(ValueError, match="cannot read mask_opt.path"):
            get_operator("inpainting", mask_opt={"mask_type": "file", "path": str(tmp_path / path)})


# ---- bad inputs ----

def test_unknown_names_and_parameters_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown operator 'blur'.*gaussian_blur.*super_resolution"):
        get_operator("blur")
    with pytest.raises(ValueError, match="unknown parameter.*sigma.*valid parameters: kernel_size, intensity"):
        get_operator("gaussian_blur", kernel_size=61, sigma=3.0)
    with pytest.raises(ValueError, match="unknown noise 'laplace'.*gaussian, poisson"):
        get_noise("laplace")
    with pytest.raises(ValueError, match="unknown mask_opt key.*mask_size.*valid keys: mask_type"):
        get_operator("inpainting", mask_opt={"mask_size": 3})
    with pytest.raises(ValueError, match="unknown mask_type 'extreme'.*box, random, file"):
        get_operator("inpainting", mask_opt={"mask_type": "extreme"})
    with pytest.raises(ValueError, match="do not apply to mask_type 'box'"):
        get_operator("inpainting", mask_opt={"mask_type": "box", "mask_prob_range": (0.3, 0.7)})


@pytest.mark.parametrize("name, params, message", [
    ("gaussian_blur", {"kernel_size": 60, "intensity": 3.0}, "kernel_size must be odd"),
    ("gaussian_blur", {"kernel_size": 61, "intensity": 0.0}, "intensity"),
    ("motion_blur", {"kernel_size": 61, "intensity": 1.5}, r"intensity must be a number >= 0.0 and <= 1.0"),
    ("super_resolution", {"scale_factor": 2.5}, "scale_factor must be an integer"),
    ("phase_retrieval", {"oversample": -1.0}, "oversample"),
    ("inpainting", {"mask_opt": {"mask_type": "random", "mask_prob_range": (0.7, 0.3)}}, "0 <= lo <= hi <= 1"),
    ("inpainting", {"mask_opt": {"box": [1, 2, 3]}}, r"\[top, left, height, width\]"),
    ("inpainting", {"mask_opt": {"box": [1, 2, 3, 4], "margin": (4, 4)}}, "margin applies only to random boxes"),
])
def test_bad_parameters(name, params, message):
    with pytest.raises(ValueError, match=message):
        get_operator(name, **params)


def test_box_that_does_not_fit():
    op = get_operator("inpainting", mask_opt={"box": [8, 0, 4, 4]})
    with pytest.raises(ValueError, match="does not fit in a 10x10 image"):
        op(torch.zeros(1, 3, 10, 10))


# ---- noise ----

def test_gaussian_noise_statistics_and_determinism():
    noise = get_noise("gaussian", sigma=0.05)
    y = torch.full((2, 3, 64, 64), 0.25)
    n = noise(y, torch.Generator().manual_seed(0)) - y
    assert abs(float(n.mean())) < 3e-3 and abs(float(n.std()) - 0.05) < 2e-3
    assert torch.equal(noise(y, torch.Generator().manual_seed(0)), noise(y, torch.Generator().manual_seed(0)))
    assert not torch.equal(noise(y, torch.Generator().manual_seed(0)), noise(y, torch.Generator().manual_seed(1)))
    # One generator per image gives each image the draw it would get alone.
    per_image = noise(y, [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
    assert torch.equal(per_image[1:], noise(y[1:], torch.Generator().manual_seed(6)))
    assert torch.equal(get_noise("gaussian", sigma=0.0)(y, torch.Generator()), y)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        noise(torch.zeros(3, 1), [torch.Generator(), torch.Generator()])


def test_poisson_noise_statistics_and_determinism():
    rate = 1.0
    noise = get_noise("poisson", rate=rate)
    y = torch.full((1, 3, 64, 64), -0.5)  # y01 = 0.25: counts ~ Poisson(63.75)
    out = noise(y, torch.Generator().manual_seed(0))
    assert out.dtype == y.dtype and out.min() >= -1 and out.max() <= 1
    counts = (out + 1) / 2 * 255 * rate
    assert torch.allclose(counts, counts.round(), atol=1e-3)  # integer photon counts
    assert abs(float(counts.mean()) - 63.75) < 0.5 and abs(float(counts.var()) - 63.75) < 6
    assert torch.equal(out, noise(y, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, noise(y, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="rate must be a number > 0"):
        get_noise("poisson", rate=0)
