"""The data-consistency solver and the DCDP loop: official golden, exact-transpose equivalence,
batch independence and divergence reporting."""
import numpy as np
import pytest
import torch

from guided_diffusion import data_consistency
from guided_diffusion.measurements import get_operator
from guided_diffusion.solver import DCDPSettings, run_dcdp
from tests.conftest import GOLDEN

CSGM = np.load(GOLDEN / "csgm_a.npz")


def test_data_consistency_matches_official_csgm():
    op = get_operator("super_resolution", in_shape=[1, 3, 256, 256], scale_factor=4, device="cpu")
    y = torch.from_numpy(CSGM["y"])
    first = []
    x = data_consistency(y, torch.zeros(1, 3, 256, 256), op, steps=100, lr=1000, momentum=0.9, history=first)
    np.testing.assert_allclose(first[0].numpy(), CSGM["x_step1"], atol=1e-6)
    np.testing.assert_allclose(x.numpy(), CSGM["x_out"], atol=1e-4)


@pytest.mark.parametrize("name,params", [
    ("super_resolution", {"in_shape": [1, 3, 64, 64], "scale_factor": 4}),
    ("gaussian_blur", {"kernel_size": 9, "intensity": 1.5}),
    ("inpainting", {"mask_opt": {"mask_type": "random", "mask_prob_range": [0.3, 0.7]}}),
    ("noise", {}),
    ("phase_retrieval", {"oversample": 2.0}),
])
def test_exact_transpose_equals_autograd(name, params):
    op = get_operator(name, device="cpu", **params)
    g = torch.Generator().manual_seed(3)
    state = op.draw_state(g, (3, 64, 64))
    gt = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    y = op.forward(gt, **state)
    x0 = torch.zeros_like(gt)
    kw = dict(steps=30, lr=200.0, momentum=0.9, weight_decay_lambda=0.5, operator_state=state)
    auto = data_consistency(y, x0, op, **kw)
    exact = data_consistency(y, x0, op, exact_transpose=True, **kw)
    torch.testing.assert_close(exact, auto, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,params", [
    ("super_resolution", {"in_shape": [1, 3, 32, 32], "scale_factor": 4}),
    ("motion_blur", {"kernel_size": 15, "intensity": 0.5}),
    ("phase_retrieval", {"oversample": 2.0}),
])
def test_mse_gradient_is_the_autograd_gradient(name, params):
    """Σ_b mean((A(x_b) − y_b)²) differentiated by autograd (float64) equals the closed form."""
    op = get_operator(name, device="cpu", **params)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        y = op.forward(torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64))
    x.grad = None
    (op.forward(x) - y).square().flatten(1).mean(dim=1).sum().backward()
    closed = op.mse_gradient(x.detach(), y)
    torch.testing.assert_close(closed, x.grad, rtol=1e-10, atol=1e-12)


class IdentityPurifier:
    """Deterministic stand-in for a prior: shrinks towards 0 with per-image noise."""

    def purify(self, x, T_k, generators):
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
        return 0.9 * x + 0.01 * noise

    def nfe(self, T_k):
        return 1


def _run(gt, seeds, settings, op):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    y = op.forward(gt)
    return run_dcdp(y, op, IdentityPurifier(), settings, gens, torch.zeros_like(gt))


def test_loop_batch_independence_and_counts():
    op = get_operator("gaussian_blur", kernel_size=9, intensity=1.5, device="cpu")
    s = DCDPSettings(K=4, tau=5, lr=1000.0, T_init=40, T_end=0)
    gt = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    both = _run(gt, [10, 11], s, op)
    second = _run(gt[1:], [11], s, op)
    torch.testing.assert_close(both.x[1:], second.x, rtol=1e-5, atol=1e-6)
    assert both.nfe == 4 and both.dc_steps == 20 and both.failed_at == [None, None]


def test_loop_reports_divergence_per_image():
    op = get_operator("noise", device="cpu")
    s = DCDPSettings(K=3, tau=2, lr=1.0, T_init=30)
    gt = torch.zeros(2, 3, 8, 8)
    gt[0, 0, 0, 0] = float("nan")
    res = _run(gt, [1, 2], s, op)
    assert res.failed_at == [0, None]
    assert torch.isfinite(res.x[1]).all()


def test_no_purification_baseline_and_final_round():
    op = get_operator("noise", device="cpu")
    s = DCDPSettings(K=3, tau=4, lr=1.0, T_init=30, purify=False, final_tau=1)
    res = _run(torch.ones(1, 3, 8, 8) * 0.5, [1], s, op)
    assert res.nfe == 0 and res.dc_steps == 9
    torch.testing.assert_close(res.x, res.x_before)


def test_bad_optimizer_and_loss():
    op = get_operator("noise", device="cpu")
    with pytest.raises(ValueError, match="valid"):
        data_consistency(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), op, 1, 0.1, optimizer="LBFGS")
    with pytest.raises(ValueError, match="valid"):
        data_consistency(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), op, 1, 0.1, loss="huber")


def test_adam_and_l1_run():
    op = get_operator("noise", device="cpu")
    y = torch.full((1, 3, 4, 4), 0.5)
    x = data_consistency(y, torch.zeros_like(y), op, 200, 0.05, optimizer="Adam", loss="L1")
    assert (x - y).abs().max() < 0.1


def test_failed_cuda_graph_capture_warns_once_and_gives_the_eager_numbers(caplog, monkeypatch):
    """A capture that fails (simulated here, where there is no GPU) leaves the eager steps, with one warning."""
    from guided_diffusion.fast_dc import CudaGraphSGD, cuda_graph_failures, sgd_closed_form, sgd_closed_form_graphed

    def refuse(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(CudaGraphSGD, "capture", refuse)
    op = get_operator("gaussian_blur", kernel_size=9, intensity=1.5)
    g = torch.Generator().manual_seed(3)
    y = op.forward(torch.rand(2, 3, 32, 32, generator=g))
    x0 = torch.zeros_like(y)
    eager = sgd_closed_form(y, x0, op, {}, 10, 100.0, 0.9, 0.0, None)
    for _ in range(2):
        out = sgd_closed_form_graphed(y, x0, op, {}, 10, 100.0, 0.9, 0.0)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert caplog.text.count("CUDA graph capture of the data-consistency steps failed") == 1
    assert cuda_graph_failures(op) == ["RuntimeError: operation not permitted when stream is capturing"]
    import gc
    import weakref

    assert "_dc_cuda_graphs" not in vars(op)  # the fast path's cache is its own, not the operator's
    ref = weakref.ref(op)
    del op
    gc.collect()
    assert ref() is None  # and it does not keep a dropped operator alive


def test_operator_errors_are_not_taken_for_capture_failures():
    """The warm-up steps run outside the capture: an operator's own error propagates unchanged."""
    from guided_diffusion.fast_dc import cuda_graph_failures, sgd_closed_form_graphed

    op = get_operator("super_resolution", scale_factor=4)
    y = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="not divisible by scale_factor"):
        sgd_closed_form_graphed(y, torch.zeros(1, 3, 30, 30), op, {}, 5, 100.0, 0.9, 0.0)
    assert cuda_graph_failures(op) == []
