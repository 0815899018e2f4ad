"""compose: linear guiders sharing their main branch, summed; one batched call per network."""

import pytest
import torch
from counting import Counting, inputs

from guidelab import guidance, toy
from guidelab.errors import GuidelabError
from guidelab.guidance import Branch, Guided
from guidelab.guidance.compose import compose


def _inputs(B=6):
    return inputs(B)


def test_three_branches_of_one_network_are_one_call_and_the_formula_holds():
    """cfg (null label) + a second reference (label 3) on the same network: one call of 3B rows;
    D = D_c + (w1 - 1)(D_c - D_u) + (w2 - 1)(D_c - D_3)."""
    x, sigma, label = _inputs()
    net = Counting()
    second = Guided(Branch(net), Branch(net, {"label": 3}), 2.5, "other")
    out = compose(guidance.cfg(net, 4.0), second)(x, sigma, label=label)
    assert [n for n, _ in net.calls] == [18]
    D_c, D_u, D_3 = (net(x, sigma, label=y) for y in (label, torch.full_like(label, 2), torch.full_like(label, 3)))
    torch.testing.assert_close(out, D_u + 4.0 * (D_c - D_u) + 1.5 * (D_c - D_3), rtol=1e-12, atol=1e-12)


def test_one_guider_or_weights_one_reduce_exactly():
    """compose(g) is g bit for bit; a term at w = 1 is dropped (no evaluation); all at w = 1 is the unguided
    main branch in one call of B rows."""
    x, sigma, label = _inputs()
    net = Counting()
    g = guidance.cfg(net, 3.0)
    assert torch.equal(compose(g)(x, sigma, label=label), g(x, sigma, label=label))
    off = Guided(Branch(net), Branch(net, {"label": 3}), 1.0, "off")
    net.calls.clear()
    assert torch.equal(compose(g, off)(x, sigma, label=label), g(x, sigma, label=label))
    assert [n for n, _ in net.calls] == [12, 12]
    net.calls.clear()
    both_off = compose(guidance.cfg(net, 1.0), off)
    assert torch.equal(both_off(x, sigma, label=label), net(x, sigma, label=label))
    assert [n for n, _ in net.calls] == [6, 6]
    w = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0], dtype=torch.float64)  # per-sample weights
    torch.testing.assert_close(
        compose(guidance.cfg(net, w), off)(x, sigma, label=label), guidance.cfg(net, w)(x, sigma, label=label), rtol=0, atol=0
    )


def test_exact_world_cfg_plus_autoguidance_and_interval():
    """Two networks (tree A main, AB and B references): the sum of both guiders' deviations from D_A."""
    A, AB, Bt = toy.tree("A", dtype=torch.float64), toy.tree("AB", dtype=torch.float64), toy.tree("B", dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    sigma = torch.full((5,), 0.3, dtype=torch.float64)
    g = compose(guidance.autoguidance(A, AB, 2.0), guidance.autoguidance(A, Bt, 1.5))
    D = A(x, sigma)
    torch.testing.assert_close(g(x, sigma), D + 1.0 * (D - AB(x, sigma)) + 0.5 * (D - Bt(x, sigma)))
    gated = guidance.interval(g, 0.5, 5.0)  # outside the interval: the main branch
    assert torch.equal(gated(x, sigma), D)


def test_mismatched_main_or_nonlinear_guiders_are_refused():
    net, other = Counting(), Counting()
    with pytest.raises(GuidelabError, match="another main branch"):
        compose(guidance.cfg(net, 2.0), guidance.cfg(other, 2.0))
    with pytest.raises(GuidelabError, match="linear guiders"):
        compose(guidance.rescale(guidance.cfg(net, 2.0), 0.7))
    with pytest.raises(GuidelabError, match="at least one"):
        compose()
