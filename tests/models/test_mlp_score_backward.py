"""ToyMLP's energy score while training runs through ``_EnergyScore``, a hand-written backward to the gain
and the effective weights (issue 15 item 9); it must give autograd's gradients."""

import pytest
import torch

from guidelab.models.mlp import ToyMLP, _EnergyScore


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    B, H, L, n, dim = 5, 4, 3, 6, 2

    def rnd(*shape, grad=False):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(grad)

    f, x_in = rnd(B, n), rnd(B, dim)
    r, sigma = rnd(B, 1).abs() + 1, rnd(B).abs() + 0.2
    gain = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    w = [rnd(H, n, grad=True)] + [rnd(H, H, grad=True) for _ in range(L)]
    assert torch.autograd.gradcheck(lambda g, *w: _EnergyScore.apply(f, x_in, r, sigma, g, dim, *w), (gain, *w))


@pytest.mark.parametrize("depth,num_classes", [(0, 0), (1, 0), (4, 0), (2, 3)])
def test_training_path_equals_autograd(depth, num_classes):
    torch.manual_seed(depth)
    m = ToyMLP(hidden=8, depth=depth, num_classes=num_classes).double().eval()
    with torch.no_grad():
        m.gain.fill_(0.7)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 2, dtype=torch.float64, generator=gen)
    sigma = torch.rand(7, dtype=torch.float64, generator=gen) + 0.05
    target = torch.randn(7, 2, dtype=torch.float64, generator=gen)
    label = torch.arange(7) % (num_classes + 1) if num_classes else None
    calls = []
    apply = _EnergyScore.apply

    def counted(*a):
        calls.append(1)
        return apply(*a)

    def grads(x_):
        m.zero_grad()
        score = m.score(x_, sigma, label)
        (sigma**2 * (score - target).square().mean(1)).mean().backward()
        return score.detach(), [p.grad.clone() for p in m.parameters()]

    _EnergyScore.apply = counted
    try:
        fast, g_fast = grads(x)
        assert len(calls) == 1  # the hand-written backward was used
        ref, g_ref = grads(x.clone().requires_grad_(True))  # x needs a gradient: the explicit pass + autograd
        assert len(calls) == 1
    finally:
        _EnergyScore.apply = apply
    torch.testing.assert_close(fast, ref, rtol=1e-13, atol=1e-13)
    for a, b in zip(g_fast, g_ref):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_no_grad_and_offsets_keep_the_explicit_pass():
    m = ToyMLP(hidden=8, depth=2).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    with torch.no_grad():
        assert m.score(x, 0.5).grad_fn is None
    off = torch.zeros(3, 8, dtype=torch.float64)
    assert type(m.score(x, 0.5, noise_embed_offset=off).grad_fn).__name__ != "_EnergyScoreBackward"
    assert type(m.score(x, 0.5).grad_fn).__name__ == "_EnergyScoreBackward"


def test_saved_tensors_survive_a_second_backward():
    """The backward writes only its own scratch: backward twice through one graph (retain_graph) gives the same
    gradients twice."""
    torch.manual_seed(3)
    m = ToyMLP(hidden=16, depth=3).double()
    with torch.no_grad():
        m.gain.fill_(0.9)
    x = torch.randn(9, 2, dtype=torch.float64)
    sigma = torch.rand(9, dtype=torch.float64) + 0.05
    score = m.score(x, sigma)
    assert type(score.grad_fn).__name__ == "_EnergyScoreBackward"
    loss = (sigma**2 * score.square().mean(1)).mean()
    first = torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(m.parameters()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_pass_and_explicit_pass_agree_bit_for_bit(dtype):
    """The same products (contiguous W^T) and element-wise formulas on both paths: TSG's zero offset (the
    explicit pass) returns the training path's score exactly."""
    torch.manual_seed(4)
    m = ToyMLP(hidden=16, depth=4).to(dtype).eval()
    with torch.no_grad():
        m.gain.fill_(0.6)
    x = torch.randn(33, 2, dtype=dtype)
    sigma = torch.rand(33, dtype=dtype) + 0.01
    fast = m.score(x, sigma)
    assert type(fast.grad_fn).__name__ == "_EnergyScoreBackward"
    explicit = m.score(x, sigma, noise_embed_offset=torch.zeros(33, 16, dtype=dtype))
    assert torch.equal(fast, explicit)
