import math

import pytest
import torch

from guidelab import toy
from guidelab.errors import GuidelabError


def test_component_counts():
    assert len(toy.tree("A")) == 1016
    assert len(toy.tree("B")) == 1016
    assert len(toy.tree("AB")) == 2032


def test_paper_tree_sanity_values(tree_a64):
    # methods.md §2.3: first class-A component and the class-A mean of a faithful rebuild.
    torch.testing.assert_close(tree_a64.mu[0], torch.tensor([0.021344, 0.063334], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(tree_a64.mean(), torch.tensor([0.37185, 0.36461], dtype=torch.float64), atol=1e-5, rtol=0)
    # Union A+B: mean ~ 0 and per-axis std ~ sigma_data = 0.5.
    x = toy.tree("AB", dtype=torch.float64).sample(200_000, generator=torch.Generator().manual_seed(0))
    assert x.mean(0).abs().max() < 0.01
    assert (x.std(0) - 0.5).abs().max() < 0.02


def test_density_is_normalised(tree_a64):
    # Integrate p(x; sigma) on a grid covering the support. The rectangle rule on a Gaussian of std s
    # errs by ~2 exp(-2 pi^2 s^2 / h^2) (Poisson summation); every component has s >= sigma >= 0.08,
    # so h = 0.037 leaves < 1e-30 (the former 450^2 grid gave the same masses to 1e-13). What is left
    # is the mass outside the box, 4e-5 at sigma = 0.3, hence a bound 20x tighter than before.
    lin = torch.linspace(-1.5, 2.2, 100, dtype=torch.float64)
    xx, yy = torch.meshgrid(lin, lin, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    h = (lin[1] - lin[0]).item()
    for sigma in (0.08, 0.3):
        mass = tree_a64.logp(pts, sigma).exp().sum().item() * h * h
        assert abs(mass - 1) < 1e-4, (sigma, mass)


def test_score_is_gradient_of_logp(tree_a64):
    g = torch.Generator().manual_seed(1)
    x = tree_a64.sample(512, 0.3, generator=g).requires_grad_(True)
    sigma = torch.rand(512, generator=g, dtype=torch.float64) * 0.5 + 1e-3
    lp = tree_a64.logp(x, sigma)
    (grad,) = torch.autograd.grad(lp.sum(), x)
    torch.testing.assert_close(tree_a64.score(x.detach(), sigma), grad, rtol=1e-9, atol=1e-9)


def test_denoiser_is_tweedie(tree_a64):
    g = torch.Generator().manual_seed(2)
    x = tree_a64.sample(256, 0.5, generator=g)
    sigma = torch.full((256,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(tree_a64.denoise(x, sigma), x + 0.25 * tree_a64.score(x, sigma))
    torch.testing.assert_close(tree_a64(x, sigma), tree_a64.denoise(x, sigma))


def test_denoiser_is_posterior_mean_by_monte_carlo(tree_a64):
    # E[x0 | x] by importance weighting clean samples with N(x; x0, sigma^2 I).
    g = torch.Generator().manual_seed(3)
    x0 = tree_a64.sample(400_000, generator=g)
    sigma = 0.3
    x = torch.tensor([[0.3, 0.3], [0.8, 0.9], [0.0, 0.5]], dtype=torch.float64)
    logw = -((x[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)
    w = torch.softmax(logw, dim=1)
    mc = w @ x0
    torch.testing.assert_close(tree_a64.denoise(x, sigma), mc, atol=5e-3, rtol=0)


def test_sample_matches_noisy_density(tree_a64):
    # Samples at sigma land where p(.; sigma) puts its mass: mean log-density equals the entropy
    # estimate from a second sample set, and per-axis moments match the analytic mixture moments.
    g = torch.Generator().manual_seed(4)
    sigma = 0.4
    x = tree_a64.sample(100_000, sigma, generator=g)
    phi = tree_a64.log_phi.exp()
    mean = (phi[:, None] * tree_a64.mu).sum(0)
    cov = (
        phi[:, None, None]
        * (
            torch.einsum("kij,kj,klj->kil", tree_a64.Q, tree_a64.L, tree_a64.Q)
            + tree_a64.mu[:, :, None] * tree_a64.mu[:, None, :]
        )
    ).sum(0) - mean[:, None] * mean[None]
    cov = cov + sigma**2 * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(x.mean(0), mean, atol=6e-3, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=6e-3, rtol=0)


def test_far_points_are_finite():
    for dtype in (torch.float32, torch.float64):
        t = toy.tree("AB", dtype=dtype)
        x = torch.tensor([[1e4, -1e4], [300.0, 0.0], [-50.0, 80.0]], dtype=dtype)
        for sigma in (0.0, 1e-3, 10.0):
            assert torch.isfinite(t.logp(x, sigma)).all()
            assert torch.isfinite(t.score(x, sigma)).all()
            assert torch.isfinite(t.denoise(x, sigma)).all()
        # Far away the score points back towards the data.
        s = t.score(x, 1.0)
        assert ((s * x).sum(1) < 0).all()


def test_float32_agrees_with_float64(tree_a64):
    x = tree_a64.sample(2000, 0.1, generator=torch.Generator().manual_seed(5))
    t32 = toy.tree("A")
    torch.testing.assert_close(t32.logp(x.float(), 0.1).double(), tree_a64.logp(x, 0.1), atol=1e-3, rtol=1e-4)


def test_sample_is_reproducible():
    t = toy.tree("A")
    a = t.sample(100, 0.2, generator=torch.Generator().manual_seed(7))
    b = t.sample(100, 0.2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "call",
    [
        lambda t: toy.tree("C"),
        lambda t: t.logp(torch.zeros(4, 3), 0.1),
        lambda t: t.logp(torch.zeros(4), 0.1),
        lambda t: t.score(torch.zeros(4, 2), -0.1),
        lambda t: t.score(torch.zeros(4, 2), torch.ones(3)),
        lambda t: t.denoise(torch.full((4, 2), math.nan), 0.1),
        lambda t: t.denoise(torch.zeros(4, 2), math.inf),
        lambda t: t.sample(-1),
    ],
)
def test_bad_input_is_one_clear_line(call):
    with pytest.raises(GuidelabError) as e:
        call(toy.tree("A"))
    assert "\n" not in str(e.value) and len(str(e.value)) > 10
