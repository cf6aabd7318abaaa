"""The DCDP loop pinned as a whole, and the pixel prior's purification opened up.

1. Full-loop regression golden (in the spirit of diffusers' full-loop scheduler tests): `run_dcdp` with
   a fixed small network (the official UNet golden `unet_a.pt`, random weights, run on 32x32 images), a
   4x super-resolution operator, K = 4 rounds (T_k = 200, 133, 67, 1, so the T_k = 1 quirk is in), a
   shorter last round (`final_tau`), two images with their own generators and measurement noise. The
   final output, the last data-consistency result and every per-round iterate (`record_iterates`) are
   compared with `tests/golden/dcdp_loop.npz`, for full DDIM and for the one-step Tweedie variant, with
   the autograd and the closed-form (`exact_transpose`) gradients.

   `dcdp_loop.npz` is a regression golden of *this* implementation, made once by `make_loop_golden`
   below (`python -m tests.test_dcdp_loop --regenerate`): it is not from the official code. Its
   correctness rests on the per-component goldens that are (`unet_a`, `operators_a`, `csgm_a`,
   `ddim_a`, `schedules`; see tests/golden/README.md) and on the white-box tests of part 2; what it adds
   is that the loop composes them as the official loop does (warm starts, the order of the phases, which
   round gets which τ and T_k, per-image noise). Regenerate it only for an intended change of the loop's
   numbers, and say why in the commit.

2. White-box tests of `PixelPrior.purify`: it equals `ddim_denoise(q_sample(x, T_k − 1, ε), T_k)` with ε
   drawn per image from the images' generators (full DDIM), or the closed-form Tweedie estimate; the
   network calls, counted by wrapping the network, equal `nfe(T_k)` and visit the official timesteps.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion.gaussian_diffusion import ALPHA_BAR, ddim_denoise, ddim_timesteps, q_sample
from guided_diffusion.measurements import get_operator
from guided_diffusion.priors import PixelPrior
from guided_diffusion.solver import DCDPSettings, run_dcdp
from guided_diffusion.unet import create_model
from tests.conftest import GOLDEN

LOOP_GOLDEN = GOLDEN / "dcdp_loop.npz"

# The loop case. lr 200 on a 3x8x8 measurement is a step of about 0.13 on ½‖Ax − y‖² per unit
# eigenvalue of AᵀA, comparable to the official SR step on 256x256 images (lr 1e3 on 3x64x64).
SETTINGS = dict(K=4, tau=5, final_tau=3, lr=200.0, T_init=200, T_end=0, schedule="linear", momentum=0.9)
DDIM_STEPS = 5
SEEDS = (3, 4)                # image b uses torch.Generator().manual_seed(SEEDS[b]), as the driver's seed + i
SIGMA = 0.05                  # measurement noise, drawn from each image's generator before the loop
VARIANTS = ("ddim", "tweedie")


def golden_unet() -> torch.nn.Module:
    """The official UNet golden's network (random weights, every layer non-zero), eval mode."""
    cfg = json.loads((GOLDEN / "unet_a.json").read_text())["create_model_kwargs"]
    model = create_model(**cfg, model_path=str(GOLDEN / "unet_a.pt"))
    return model.eval().requires_grad_(False)


def generators(seeds=SEEDS) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def sr_operator():
    return get_operator("super_resolution", in_shape=[1, 3, 32, 32], scale_factor=4, device="cpu")


def loop_inputs() -> tuple[torch.Tensor, torch.Tensor, list[torch.Generator]]:
    """Ground truth (2, 3, 32, 32) in [-1, 1], its noisy measurement, and the images' generators (after the
    measurement-noise draw, as in the driver)."""
    gt = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2024)) * 2 - 1
    gens = generators()
    y_clean = sr_operator().forward(gt)
    y = torch.cat([y_clean[b:b + 1] + SIGMA * torch.randn(y_clean[b:b + 1].shape, generator=g)
                   for b, g in enumerate(gens)])
    return gt, y, gens


def run_case(variant: str, model: torch.nn.Module, exact_transpose: bool = False):
    _, y, gens = loop_inputs()
    prior = PixelPrior(model, full_ddim=variant == "ddim", ddim_num_iterations=DDIM_STEPS, precision="fp32")
    settings = DCDPSettings(**SETTINGS, exact_transpose=exact_transpose)
    return run_dcdp(y, sr_operator(), prior, settings, gens, prior.init(y.shape[:1] + (3, 32, 32), gens),
                    record_iterates=True)


def make_loop_golden(path: Path = LOOP_GOLDEN) -> None:
    """Write the regression golden from the current code (autograd gradients, fp32, CPU, one thread)."""
    torch.set_num_threads(1)
    model = golden_unet()
    gt, y, _ = loop_inputs()
    arrays = {"gt": gt.numpy(), "y": y.numpy(),
              "timesteps": np.array(DCDPSettings(**SETTINGS).timesteps(), dtype=np.int64)}
    for variant in VARIANTS:
        res = run_case(variant, model)
        arrays[f"{variant}_x"] = res.x.numpy()
        arrays[f"{variant}_x_before"] = res.x_before.numpy()
        arrays[f"{variant}_iterates"] = torch.stack(res.iterates).numpy()   # (3K, B, 3, 32, 32)
        arrays[f"{variant}_counts"] = np.array([res.nfe, res.dc_steps], dtype=np.int64)
    np.savez_compressed(path, **arrays)


@pytest.fixture(scope="module")
def model():
    return golden_unet()


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(LOOP_GOLDEN))


def test_loop_golden_inputs(golden):
    gt, y, _ = loop_inputs()
    np.testing.assert_array_equal(golden["timesteps"], [200, 133, 67, 1])
    assert DCDPSettings(**SETTINGS).timesteps() == golden["timesteps"].tolist()
    np.testing.assert_allclose(gt.numpy(), golden["gt"], rtol=0, atol=0)
    np.testing.assert_allclose(y.numpy(), golden["y"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("exact_transpose", [False, True], ids=["autograd", "closed_form"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_full_loop_matches_golden(model, golden, variant, exact_transpose):
    res = run_case(variant, model, exact_transpose)
    K = SETTINGS["K"]
    # counts: DDIM visits min(T_k, 5) timesteps (T_k = 1 is bumped to 2), Tweedie one per round
    expected_nfe = sum(len(ddim_timesteps(t, DDIM_STEPS)) for t in golden["timesteps"]) if variant == "ddim" else K
    assert [res.nfe, res.dc_steps] == golden[f"{variant}_counts"].tolist() == [expected_nfe, 5 + 5 + 5 + 3]
    assert res.failed_at == [None, None]
    iterates = golden[f"{variant}_iterates"]
    assert len(res.iterates) == 3 * K == len(iterates)
    for j, (got, want) in enumerate(zip(res.iterates, iterates)):
        k, which = divmod(j, 3)
        what = ("after the first data-consistency step", "after data consistency", "after purification")[which]
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-4, err_msg=f"round {k}, {what}")
    np.testing.assert_allclose(res.x_before.numpy(), golden[f"{variant}_x_before"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(res.x.numpy(), golden[f"{variant}_x"], rtol=0, atol=1e-4)
    # the loop's structure, on the stored numbers: round k's purified x is round k+1's starting point,
    # and the output is the last purified iterate
    np.testing.assert_array_equal(golden[f"{variant}_x"], iterates[-1])
    np.testing.assert_array_equal(golden[f"{variant}_x_before"], iterates[-2])


def test_golden_rounds_are_warm_started_and_purified(golden):
    """Sanity of the stored golden itself: every round changes x, the purified iterates lie in [-1, 1]
    (x̂₀ is clipped), and the rounds do not restart (round 2's first step is close to round 1's output,
    not to the zeros it started from)."""
    for variant in VARIANTS:
        it = golden[f"{variant}_iterates"]
        for k in range(SETTINGS["K"]):
            assert np.abs(it[3 * k + 2]).max() <= 1.0
            assert np.abs(it[3 * k + 2] - it[3 * k + 1]).max() > 1e-2
        gap_warm = np.abs(it[3] - it[2]).mean()
        gap_cold = np.abs(it[3] - it[0]).mean()
        assert gap_warm < gap_cold


# ---------------------------------------------------------------------------------------------
# White-box: PixelPrior.purify
# ---------------------------------------------------------------------------------------------

class Counting(torch.nn.Module):
    """Wraps the network and records the timesteps of every call."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls: list[list[int]] = []

    def forward(self, x, t):
        self.calls.append(t.tolist())
        return self.net(x, t)


def purify_input() -> torch.Tensor:
    # a data-consistency result is not bounded: include values outside [-1, 1] (q_sample does not clip)
    return 1.3 * torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(77))


def per_image_noise(shape, seeds) -> torch.Tensor:
    """The draws purify must make: image b's ε ~ N(0, I) from its own generator, one randn of (3, H, W)."""
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generators(seeds)])


@pytest.mark.parametrize("T_k", [1, 2, 7, 133, 400])
def test_pixel_prior_ddim_purify_is_ddim_of_q_sample(model, T_k):
    seeds, n = (11, 12), DDIM_STEPS
    counted = Counting(model)
    prior = PixelPrior(counted, full_ddim=True, ddim_num_iterations=n, precision="fp32")
    x = purify_input()
    out = prior.purify(x, T_k, generators(seeds))
    # the network calls: exactly nfe(T_k), at the official kept timesteps from the top down, every image
    # of the batch at the same t
    kept = ddim_timesteps(T_k, n)
    assert len(counted.calls) == prior.nfe(T_k) == len(kept)
    assert counted.calls == [[t, t] for t in reversed(kept)]
    # the composition: noise at the original index T_k − 1 with the images' own draws, then DDIM from T_k
    eps = per_image_noise(x.shape, seeds)
    expected = ddim_denoise(model, q_sample(x, T_k - 1, eps), T_k, n)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # and not at T_k (a one-step shift of the noise level is visible)
    if T_k < 1000:
        assert (ddim_denoise(model, q_sample(x, T_k, eps), T_k, n) - out).abs().max() > 1e-4


@pytest.mark.parametrize("T_k", [1, 2, 133, 400])
def test_pixel_prior_tweedie_purify_closed_form(model, T_k):
    seeds = (21, 22)
    counted = Counting(model)
    prior = PixelPrior(counted, full_ddim=False, ddim_num_iterations=20, precision="fp32")
    x = purify_input()
    out = prior.purify(x, T_k, generators(seeds))
    t = max(T_k, 2) - 1                       # the network's timestep (T_k = 1 is bumped to 2, so t = 1)
    assert counted.calls == [[t, t]] and prior.nfe(T_k) == 1
    # x_t = sqrt(ᾱ_{T_k−1})·x + sqrt(1 − ᾱ_{T_k−1})·ε;  x̂₀ = clip((x_t − sqrt(1 − ᾱ_t)·ε̂(x_t, t)) / sqrt(ᾱ_t), −1, 1)
    eps = per_image_noise(x.shape, seeds).double()
    a_noise, a_t = ALPHA_BAR[T_k - 1], ALPHA_BAR[t]
    x_t = math.sqrt(a_noise) * x.double() + math.sqrt(1 - a_noise) * eps
    eps_hat = model(x_t.float(), torch.full((2,), t)).double()[:, :3]
    expected = ((x_t - math.sqrt(1 - a_t) * eps_hat) / math.sqrt(a_t)).clamp(-1, 1)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)


def test_purify_noise_is_per_image_and_batch_independent(model):
    """Image b's purification depends on its own generator only (not on the batch it is in)."""
    prior = PixelPrior(model, full_ddim=True, ddim_num_iterations=DDIM_STEPS, precision="fp32")
    x = purify_input()
    both = prior.purify(x, 133, generators((11, 12)))
    alone = prior.purify(x[1:], 133, generators((12,)))
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    same_input = prior.purify(x[:1].expand(2, -1, -1, -1).contiguous(), 133, generators((11, 12)))
    assert (same_input[0] - same_input[1]).abs().max() > 1e-2     # two generators: two noises


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        raise SystemExit("usage: python -m tests.test_dcdp_loop --regenerate   (rewrites tests/golden/dcdp_loop.npz)")
    make_loop_golden()
    print(f"wrote {LOOP_GOLDEN} ({LOOP_GOLDEN.stat().st_size} bytes)")
