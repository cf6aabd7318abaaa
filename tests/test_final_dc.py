"""`DCDPSettings.final_dc_iterations`: a final data-consistency phase after the last purification.

With the default 0 the loop is unchanged (bit-identical output, same counters); with n > 0 the output is
exactly `data_consistency` run for n steps (same lr, momentum, optimiser, loss, flags) from the
no-final-DC output, `x_before` stays the last round's data-consistency iterate, `dc_steps` grows by n and
`nfe` does not change.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from guided_diffusion.measurements import get_operator
from guided_diffusion.solver import DCDPSettings, data_consistency, run_dcdp


class ShrinkPurifier:
    """A deterministic stand-in for a prior: x ↦ 0.9·x + 0.01·ε (ε from the images' generators), one NFE."""

    def purify(self, x, T_k, generators):
        noise = torch.cat([torch.randn(x[:1].shape, generator=g) for g in generators])
        return 0.9 * x + 0.01 * noise

    def nfe(self, T_k):
        return 1


def problem():
    op = get_operator("super_resolution", device=torch.device("cpu"), in_shape=[2, 3, 16, 16], scale_factor=4)
    gt = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = op.forward(gt) + 0.05 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    return op, y


def solve(op, y, settings):
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    return run_dcdp(y, op, ShrinkPurifier(), settings, gens, torch.zeros(2, 3, 16, 16))


BASE = dict(K=4, tau=5, lr=50.0, T_init=200, T_end=0, momentum=0.9)


@pytest.mark.parametrize("exact", [False, True])
def test_default_is_unchanged(exact):
    op, y = problem()
    settings = DCDPSettings(**BASE, exact_transpose=exact)
    assert settings.final_dc_iterations == 0
    a = solve(op, y, settings)
    b = solve(op, y, dataclasses.replace(settings, final_dc_iterations=0))
    assert torch.equal(a.x, b.x) and torch.equal(a.x_before, b.x_before)
    assert (a.nfe, a.dc_steps) == (b.nfe, b.dc_steps) == (4, 20)


@pytest.mark.parametrize("exact,optimizer", [(False, "SGD"), (True, "SGD"), (False, "Adam")])
def test_final_phase_is_data_consistency_of_the_plain_output(exact, optimizer):
    op, y = problem()
    lr = 0.05 if optimizer == "Adam" else BASE["lr"]
    plain = DCDPSettings(**{**BASE, "lr": lr}, optimizer=optimizer, exact_transpose=exact)
    n = 7
    a = solve(op, y, plain)
    b = solve(op, y, dataclasses.replace(plain, final_dc_iterations=n))
    expected = data_consistency(y, a.x, op, n, lr, plain.momentum, optimizer, plain.loss,
                                exact_transpose=exact)
    assert torch.equal(b.x, expected)
    assert not torch.equal(b.x, a.x)
    assert torch.equal(b.x_before, a.x_before)        # the last DC iterate before the last purification
    assert b.nfe == a.nfe and b.dc_steps == a.dc_steps + n
    assert b.failed_at == [None, None]


def test_non_finite_in_final_phase_is_recorded():
    """An image that becomes NaN/Inf only in the final phase is recorded at outer iteration K."""
    op, y = problem()
    settings = DCDPSettings(K=1, tau=1, lr=1e5, T_init=10)   # one step: finite; 2000 more: divergent
    assert solve(op, y, settings).failed_at == [None, None]
    r = solve(op, y, dataclasses.replace(settings, final_dc_iterations=2000))
    assert not torch.isfinite(r.x).all()
    assert r.failed_at == [1, 1]


# --- average_last_rounds: the output is the mean of x over the last m rounds --------------------------


def solve_recording(op, y, settings):
    """`solve`, also returning x at the end of every round (as the callback sees it)."""
    rounds = []
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    r = run_dcdp(y, op, ShrinkPurifier(), settings, gens, torch.zeros(2, 3, 16, 16),
                 callback=lambda k, T, before, after: rounds.append(after.clone()))
    return r, rounds


@pytest.mark.parametrize("purify", [True, False])
def test_average_of_the_last_rounds(purify):
    op, y = problem()
    plain = DCDPSettings(**BASE, purify=purify)
    assert plain.average_last_rounds == 1
    a, rounds = solve_recording(op, y, plain)
    assert torch.equal(a.x, rounds[-1])                        # m = 1: the last round's x (official)
    for m in (2, 4):
        b, again = solve_recording(op, y, dataclasses.replace(plain, average_last_rounds=m))
        assert all(torch.equal(u, v) for u, v in zip(rounds, again))   # the rounds themselves are unchanged
        torch.testing.assert_close(b.x, torch.stack(rounds[-m:]).mean(0), rtol=0, atol=1e-6)
        assert not torch.allclose(b.x, a.x, atol=1e-4)
        assert torch.equal(b.x_before, a.x_before)
        assert (b.nfe, b.dc_steps) == (a.nfe, a.dc_steps)


def test_final_phase_starts_from_the_average():
    op, y = problem()
    avg = DCDPSettings(**BASE, average_last_rounds=3)
    a = solve(op, y, avg)
    b = solve(op, y, dataclasses.replace(avg, final_dc_iterations=5))
    assert torch.equal(b.x, data_consistency(y, a.x, op, 5, BASE["lr"], BASE["momentum"]))


@pytest.mark.parametrize("m", [0, 5])
def test_average_out_of_range_is_refused(m):
    op, y = problem()
    with pytest.raises(ValueError, match="average_last_rounds must be between 1 and K = 4"):
        solve(op, y, DCDPSettings(**BASE, average_last_rounds=m))


# --- purification_transforms: round k purifies in the k-th frame (flips, quarter turns) ---------------


class MarkPurifier:
    """x ↦ x + R: a purifier that is not equivariant (R is a fixed pattern in the frame it is given x in)."""

    def __init__(self):
        self.shapes = []

    def purify(self, x, T_k, generators):
        self.shapes.append(tuple(x.shape))
        h, w = x.shape[-2:]
        pattern = torch.arange(h * w, dtype=x.dtype).reshape(h, w) / (h * w)
        return x + pattern

    def nfe(self, T_k):
        return 1


def frames_by_hand(name):
    """The frames written out: (what is done to x before purification, how it is undone)."""
    ident = (lambda v: v, lambda v: v)
    flip = (lambda v: v.flip(-1), lambda v: v.flip(-1))
    turn = [(lambda v, r=r: torch.rot90(v, r, (-2, -1)), lambda v, r=r: torch.rot90(v, -r, (-2, -1))) for r in range(4)]
    turned_flip = [(lambda v, r=r: torch.rot90(v, r, (-2, -1)).flip(-1), lambda v, r=r: torch.rot90(v.flip(-1), -r, (-2, -1)))
                   for r in range(4)]
    return {"none": [ident], "flip": [ident, flip], "dihedral": turn + turned_flip}[name]


@pytest.mark.parametrize("name", ["flip", "dihedral"])
def test_each_round_purifies_in_its_frame(name):
    op = get_operator("super_resolution", device=torch.device("cpu"), in_shape=[1, 3, 8, 16], scale_factor=4)
    y = op.forward(torch.rand(1, 3, 8, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    settings = DCDPSettings(K=10, tau=2, lr=5.0, T_init=100, purification_transforms=name)
    rounds, befores = [], []
    purifier = MarkPurifier()
    run_dcdp(y, op, purifier, settings, [torch.Generator()], torch.zeros(1, 3, 8, 16),
             callback=lambda k, T, before, after: (befores.append(before.clone()), rounds.append(after.clone())))
    frames = frames_by_hand(name)
    for k in range(10):
        to_frame, back = frames[k % len(frames)]
        expected = back(MarkPurifier().purify(to_frame(befores[k]), 0, None))
        torch.testing.assert_close(rounds[k], expected, rtol=0, atol=1e-6)
        assert purifier.shapes[k] == tuple(to_frame(befores[k]).shape)   # a quarter turn swaps H and W
    assert {s[-2:] for s in purifier.shapes} == ({(8, 16), (16, 8)} if name == "dihedral" else {(8, 16)})


def test_transforms_none_is_the_official_purification():
    op, y = problem()
    a = solve(op, y, DCDPSettings(**BASE))
    b = solve(op, y, DCDPSettings(**BASE, purification_transforms="none"))
    assert DCDPSettings(**BASE).purification_transforms == "none"
    assert torch.equal(a.x, b.x) and torch.equal(a.x_before, b.x_before)
    c = solve(op, y, DCDPSettings(**BASE, purification_transforms="dihedral"))
    assert not torch.allclose(c.x, a.x, atol=1e-4)      # the noise of rounds 1.. is drawn in turned frames
    assert (c.nfe, c.dc_steps) == (a.nfe, a.dc_steps)   # no extra network call, no extra step


def test_unknown_transform_is_refused():
    op, y = problem()
    with pytest.raises(ValueError, match="unknown purification_transforms 'rotate'; valid: none, flip, dihedral"):
        solve(op, y, DCDPSettings(**BASE, purification_transforms="rotate"))
