"""Checks that need a CUDA device (skipped elsewhere; `scripts/gpu_session.sh` runs them on a lent GPU).

- the data-consistency steps replayed from a CUDA graph equal the eager steps, and the CPU;
- the network compiled with CUDA graphs (reduce-overhead) inside the DDIM loop equals eager;
- bf16 autocast stays close to fp32;
- the fast DCDP loop on CUDA (batched, graphs, bf16) matches the CPU reference within 0.05 dB.
"""
import numpy as np
import pytest
import torch

from guided_diffusion.measurements import get_operator
from guided_diffusion.priors import PixelPrior
from guided_diffusion.fast_dc import cached_graphs, cuda_graph_failures, sgd_closed_form
from guided_diffusion.solver import DCDPSettings, data_consistency, run_dcdp
from guided_diffusion.unet import create_model
from tests.test_driver import TINY_UNET
from util.metrics import psnr

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OPERATORS = [
    ("super_resolution", {"in_shape": [1, 3, 64, 64], "scale_factor": 4}),
    ("gaussian_blur", {"kernel_size": 61, "intensity": 3.0}),
    ("motion_blur", {"kernel_size": 61, "intensity": 0.5}),
    ("inpainting", {"mask_opt": {"mask_type": "random", "mask_prob_range": [0.3, 0.7]}}),
    ("noise", {}),
    ("phase_retrieval", {"oversample": 2.0}),
]


def _problem(op, seed: int, batch: int = 3, size: int = 64):
    gens = [torch.Generator().manual_seed(seed + b) for b in range(batch)]
    states = [op.draw_state(g, (3, size, size)) for g in gens]
    state = {k: torch.cat([s[k] for s in states]).cuda() for k in states[0]} if states[0] else {}
    gt = (torch.stack([torch.rand(3, size, size, generator=g) for g in gens]) * 2 - 1).cuda()
    return op.forward(gt, **state), state


@pytest.mark.parametrize("name,params", OPERATORS)
def test_cuda_graph_data_consistency_equals_eager_and_cpu(name, params):
    op = get_operator(name, device="cuda", **params)
    kw = dict(steps=25, lr=300.0, momentum=0.9, weight_decay_lambda=0.1)
    for seed in (0, 10):  # the second call replays the graph captured by the first, with new y and state
        y, state = _problem(op, seed)
        x0 = torch.randn(y.shape[0], 3, 64, 64, generator=torch.Generator().manual_seed(seed)).cuda()
        graphed = data_consistency(y, x0, op, operator_state=state, exact_transpose=True, cuda_graph=True, **kw)
        eager = sgd_closed_form(y, x0, op, state, kw["steps"], kw["lr"], kw["momentum"], kw["weight_decay_lambda"], None)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
        cpu_op = get_operator(name, device="cpu", **params)
        cpu = sgd_closed_form(y.cpu(), x0.cpu(), cpu_op, {k: v.cpu() for k, v in state.items()}, kw["steps"], kw["lr"],
                          kw["momentum"], kw["weight_decay_lambda"], None)
        torch.testing.assert_close(graphed.cpu(), cpu, rtol=1e-3, atol=1e-3)
    assert cuda_graph_failures(op) == [] and cached_graphs(op) == 1  # captured, not eager


def _random_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(**TINY_UNET)
    with torch.no_grad():  # a fresh ADM UNet outputs zeros: give every layer weights
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.cuda().eval().requires_grad_(False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_compiled_network_with_cuda_graphs_in_the_ddim_loop(no_tf32):
    model = _random_unet()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).cuda() * 2 - 1
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(4)]  # noqa: E731
    eager = PixelPrior(model, ddim_num_iterations=20, precision="fp32", device="cuda").purify(x, 400, gens())
    compiled = PixelPrior(torch.compile(model.to(memory_format=torch.channels_last), mode="reduce-overhead"),
                          ddim_num_iterations=20, precision="fp32", device="cuda")
    first = compiled.purify(x, 400, gens())
    again = compiled.purify(x, 400, gens())  # replays the recorded graphs
    assert _rel(first, eager) < 1e-4, _rel(first, eager)
    torch.testing.assert_close(again, first)
    bf16 = PixelPrior(model, ddim_num_iterations=20, precision="bf16", device="cuda").purify(x, 400, gens())
    assert _rel(bf16, eager) < 3e-2, _rel(bf16, eager)


def test_fast_loop_on_cuda_matches_cpu_reference_within_0_05_db():
    model = _random_unet()
    op_cpu = get_operator("super_resolution", in_shape=[1, 3, 32, 32], scale_factor=4)
    gt = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = op_cpu.forward(gt)
    settings = dict(K=4, tau=20, lr=1000.0, T_init=100, T_end=0)
    ref = []
    prior = PixelPrior(model.cpu(), ddim_num_iterations=5, precision="fp32")
    for b in range(4):
        ref.append(run_dcdp(y[b:b + 1], op_cpu, prior, DCDPSettings(**settings),
                            [torch.Generator().manual_seed(b)], torch.zeros(1, 3, 32, 32)).x)
    ref = torch.cat(ref)
    model = model.cuda().to(memory_format=torch.channels_last)
    fast_prior = PixelPrior(torch.compile(model, mode="reduce-overhead"), ddim_num_iterations=5, precision="bf16",
                            device="cuda")
    op = get_operator("super_resolution", in_shape=[1, 3, 32, 32], scale_factor=4, device="cuda")
    fast = run_dcdp(y.cuda(), op, fast_prior, DCDPSettings(**settings, exact_transpose=True, cuda_graphs=True),
                    [torch.Generator().manual_seed(b) for b in range(4)], torch.zeros(4, 3, 32, 32, device="cuda"),
                    check_finite=False).x.cpu()
    assert cuda_graph_failures(op) == [] and cached_graphs(op) >= 1
    gap = abs(np.mean(psnr(gt, fast)) - np.mean(psnr(gt, ref)))
    assert gap < 0.05, gap
