"""Schedules, DDIM timesteps, q_sample, DDIM and Tweedie purification against the official goldens."""
import json

import numpy as np
import pytest
import torch

from guided_diffusion.gaussian_diffusion import (
    ALPHA_BAR, SCHEDULE_KINDS, ddim_denoise, ddim_nfe, ddim_timesteps, purification_schedule, q_sample,
    randn_per_image, tweedie_denoise,
)
from tests.conftest import GOLDEN

SCHEDULES = json.loads((GOLDEN / "schedules.json").read_text())
DDIM = np.load(GOLDEN / "ddim_a.npz")


def fake_model(x, t):
    """The golden's deterministic ε-model: 0.5·tanh(x) + 0.0005·t·mean(x), plus 3 zero channels."""
    eps = 0.5 * torch.tanh(x) + (0.0005 * t.float()).view(-1, 1, 1, 1) * x.mean(dim=(1, 2, 3), keepdim=True)
    return torch.cat([eps, torch.zeros_like(eps)], dim=1)


@pytest.mark.parametrize("case", SCHEDULES["purification_schedule"],
                         ids=lambda c: f"{c['schedule_type']}-{c['K']}-{c['T_init']}-{c['T_end']}")
def test_purification_schedule_matches_official(case):
    got = purification_schedule(case["K"], case["T_init"], case["T_end"], case["schedule_type"])
    assert got == case["timesteps"]


def test_all_schedule_kinds_covered_by_golden():
    assert {c["schedule_type"] for c in SCHEDULES["purification_schedule"]} == set(SCHEDULE_KINDS)


@pytest.mark.parametrize("case", SCHEDULES["ddim"], ids=lambda c: f"Tk{c['Tk']}")
def test_ddim_timesteps_match_official(case):
    kept = ddim_timesteps(case["Tk"], 20)
    assert kept == case["kept_timesteps"]
    assert len(kept) == case["ddim_num_iters"] == ddim_nfe(case["Tk"], 20)
    np.testing.assert_allclose(ALPHA_BAR[kept], case["alphas_cumprod_kept"], rtol=0, atol=1e-12)


def test_alpha_bar():
    np.testing.assert_array_equal(ALPHA_BAR, DDIM["alphas_cumprod"])


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="valid kinds"):
        purification_schedule(10, 400, 0, "exponential")
    with pytest.raises(ValueError, match="total_num_iterations"):
        purification_schedule(500, 400, 0, "linear")


def test_q_sample():
    x0, noise = torch.from_numpy(DDIM["x_start"]), torch.from_numpy(DDIM["noise"])
    np.testing.assert_allclose(q_sample(x0, 399, noise).numpy(), DDIM["qsample_399"], atol=1e-6)


def test_ddim_trajectory_and_output():
    """`ddim_tk400_traj[i]` is x after the i-th of the 20 steps (t = 399, 378, ..., 0). ddim_denoise returns
    only the last, so the trajectory is read off the network's inputs: step i + 1 is called on the x that
    step i produced."""
    x = torch.from_numpy(DDIM["x_start"])
    seen = []

    def recording_model(x_t, t):
        seen.append((int(t[0]), x_t.clone()))
        return fake_model(x_t, t)

    out = ddim_denoise(recording_model, x, 400, 20)
    traj = DDIM["ddim_tk400_traj"]
    assert traj.shape == (20, 1, 3, 32, 32)
    assert [t for t, _ in seen] == ddim_timesteps(400, 20)[::-1]
    np.testing.assert_array_equal(seen[0][1].numpy(), DDIM["x_start"])       # the first call sees the input
    got = torch.stack([x_t for _, x_t in seen[1:]] + [out]).numpy()          # x after each step
    for i in range(20):
        np.testing.assert_allclose(got[i], traj[i], rtol=0, atol=1e-5, err_msg=f"after step {i} (t = {seen[i][0]})")
    np.testing.assert_array_equal(traj[-1], DDIM["ddim_tk400"])              # the golden's own consistency
    np.testing.assert_allclose(out.numpy(), DDIM["ddim_tk400"], atol=1e-5)


def test_full_purification_step():
    x = q_sample(torch.from_numpy(DDIM["x_start"]), 399, torch.from_numpy(DDIM["noise"]))
    np.testing.assert_allclose(ddim_denoise(fake_model, x, 400, 20).numpy(), DDIM["purify_tk400"], atol=1e-5)


def test_tweedie():
    x = torch.from_numpy(DDIM["x_start"])
    np.testing.assert_allclose(tweedie_denoise(fake_model, x, 400).numpy(), DDIM["tweedie_tk400"], atol=1e-5)


def test_tk1_quirk_runs_two_steps_from_t1():
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return fake_model(x, t)

    ddim_denoise(model, torch.zeros(1, 3, 8, 8), 1, 20)
    tweedie_denoise(model, torch.zeros(1, 3, 8, 8), 1)
    assert seen == [1, 0, 1]


def test_randn_per_image_is_batch_independent():
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    both = randn_per_image((2, 3, 4, 4), gens([5, 6]), "cpu")
    alone = randn_per_image((1, 3, 4, 4), gens([6]), "cpu")
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one generator per image"):
        randn_per_image((2, 3, 4, 4), gens([1]), "cpu")
