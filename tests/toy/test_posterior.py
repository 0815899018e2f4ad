"""toy.linear_posterior against Bayes' rule, Monte Carlo (importance-weighted prior samples) and its own
noise-free limit; misuse refused."""

import math

import pytest
import torch

from guidelab import toy
from guidelab.errors import GuidelabError

F64 = torch.float64


def _random_mixture(D=3, K=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.rand(K, generator=g, dtype=F64) + 0.2
    mu = torch.randn(K, D, generator=g, dtype=F64)
    B = torch.randn(K, D, D, generator=g, dtype=F64) * 0.4
    Sigma = B @ B.transpose(1, 2) + 0.05 * torch.eye(D, dtype=F64)
    return toy.GaussianMixture(phi, mu, Sigma, dtype=F64)


def _loglik(x, A, y, s):
    r = x @ A.T - y
    return -0.5 * r.square().sum(1) / s**2 - 0.5 * len(y) * math.log(2 * math.pi * s**2)


@pytest.mark.parametrize("which", ["tree", "random"])
def test_bayes_rule_noisy(which, tree_a64):
    prior = tree_a64 if which == "tree" else _random_mixture()
    d = prior.dim
    A = torch.tensor([[1.0, 0.5] + [0.0] * (d - 2), [0.0, 1.0] + [0.3] * (d - 2)], dtype=F64)[: d - 1 if which == "tree" else 2]
    y = torch.full((A.shape[0],), 0.4, dtype=F64)
    post = toy.linear_posterior(prior, A, y, 0.1)
    x = prior.sample(64, generator=torch.Generator().manual_seed(1)) + 0.05
    # log p(x | y) = log p(x) + log p(y | x) - log p(y)
    torch.testing.assert_close(post.logp(x), prior.logp(x) + _loglik(x, A, y, 0.1) - post.log_evidence, rtol=0, atol=1e-9)


def test_evidence_and_moments_match_importance_weighted_prior_samples(tree_a64):
    A, y, s = torch.tensor([[0.6, 0.8]], dtype=F64), torch.tensor([0.5], dtype=F64), 0.05
    post = toy.linear_posterior(tree_a64, A, y, s)
    x = tree_a64.sample(200_000, generator=torch.Generator().manual_seed(0))
    logw = _loglik(x, A, y, s)
    # evidence: p(y) = E_prior[p(y | x)]
    assert abs(float(torch.logsumexp(logw, 0) - math.log(len(x))) - post.log_evidence) < 0.02
    w = torch.softmax(logw, 0)
    ess = float(1 / w.square().sum())
    assert ess > 2000
    mean_is = (w[:, None] * x).sum(0)
    cov_is = (w[:, None, None] * (x - mean_is)[:, :, None] * (x - mean_is)[:, None, :]).sum(0)
    xs = post.sample(100_000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(post.mean(), mean_is, rtol=0, atol=0.01)
    torch.testing.assert_close(xs.mean(0), mean_is, rtol=0, atol=0.01)
    torch.testing.assert_close(torch.cov(xs.T), cov_is, rtol=0, atol=0.005)
    # a non-linear statistic: P(x_2 > x_1 | y)
    p_is = float((w * (x[:, 1] > x[:, 0]).to(F64)).sum())
    assert abs(float((xs[:, 1] > xs[:, 0]).to(F64).mean()) - p_is) < 0.02


def test_noise_free_mask_is_the_prior_restricted_to_the_line(tree_a64):
    # Observe x_1 = c exactly: p(x_2 | x_1 = c) = p(c, x_2) / int p(c, t) dt.
    c = 0.3
    post = toy.linear_posterior(tree_a64, torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([c], dtype=F64), 0.0)
    t = torch.linspace(-1.0, 2.5, 20001, dtype=F64)
    line = torch.stack([torch.full_like(t, c), t], 1)
    lp = tree_a64.logp(line)
    log_norm = float(torch.logsumexp(lp, 0) + math.log(float(t[1] - t[0])))  # quadrature of the marginal
    on = lp > lp.max() - 200  # (components of weight < 1e-308 drop out: far tails differ)
    torch.testing.assert_close(post.logp(line[on][::200]), lp[on][::200] - log_norm, rtol=0, atol=1e-4)
    assert bool(torch.isinf(post.logp(torch.tensor([[c + 0.01, 0.5]], dtype=F64))).all())
    xs = post.sample(1000, generator=torch.Generator().manual_seed(0))
    assert float(xs[:, 0].sub(c).abs().max()) < 1e-12
    assert float(post.consistency(xs).max()) < 1e-12


def test_noise_free_is_the_limit_of_small_noise_at_every_sigma(tree_a64):
    A, y = torch.tensor([[0.6, 0.8]], dtype=F64), torch.tensor([0.5], dtype=F64)
    exact = toy.linear_posterior(tree_a64, A, y, 0.0)
    near = toy.linear_posterior(tree_a64, A, y, 1e-5)
    x = tree_a64.sample(32, generator=torch.Generator().manual_seed(2))
    for sigma in (0.05, 0.3, 2.0):
        torch.testing.assert_close(exact.logp(x, sigma), near.logp(x, sigma), rtol=0, atol=1e-4)
        torch.testing.assert_close(exact.denoise(x, sigma), near.denoise(x, sigma), rtol=0, atol=1e-5)
    assert abs(exact.log_evidence - near.log_evidence) < 1e-4


@pytest.mark.parametrize("noise_std", [0.1, 0.0])
def test_score_is_the_gradient_of_logp_and_denoise_is_tweedie(noise_std):
    prior = _random_mixture(seed=3)
    A = torch.tensor([[1.0, -1.0, 0.5]], dtype=F64)
    post = toy.linear_posterior(prior, A, torch.tensor([0.2], dtype=F64), noise_std)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    sigma = torch.rand(16, generator=torch.Generator().manual_seed(5), dtype=F64) + 0.1
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(post.logp(xr, sigma).sum(), xr)
    torch.testing.assert_close(post.score(x, sigma), g, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(post.denoise(x, sigma), x + sigma[:, None] ** 2 * g, rtol=1e-8, atol=1e-8)
    # the heat-diffused posterior is what sampling at sigma gives: mean of sample(n, sigma) = posterior mean
    xs = post.sample(50_000, 0.5, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(xs.mean(0), post.mean(), rtol=0, atol=0.02)


def test_image_world_mask_posterior_keeps_the_known_pixels():
    world = toy.digits_gmm(dtype=F64)
    assert world.dim == 64 and len(world) == 10
    truth = world.sample(1, generator=torch.Generator().manual_seed(0))[0]
    known = torch.zeros(8, 8, dtype=torch.bool)
    known[:, :4] = True  # left half observed
    A = torch.eye(64, dtype=F64)[known.flatten()]
    post = toy.linear_posterior(world, A, truth[known.flatten()], 0.0)
    xs = post.sample(8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(xs[:, known.flatten()], truth[known.flatten()].expand(8, -1), rtol=0, atol=1e-12)
    assert bool(torch.isfinite(post.logp(xs)).all())


def test_misuse_is_one_clear_error(tree_a64):
    A, y = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([0.3], dtype=F64)
    bad = [
        (lambda: toy.linear_posterior(tree_a64, torch.ones(1, 3, dtype=F64), y, 0.1), "shape \\[m, d=2\\]"),
        (lambda: toy.linear_posterior(tree_a64, A, torch.ones(2, dtype=F64), 0.1), "y must be a tensor of shape \\[m=1\\]"),
        (lambda: toy.linear_posterior(tree_a64, A, torch.tensor([math.nan], dtype=F64), 0.1), "NaN"),
        (lambda: toy.linear_posterior(tree_a64, A, y, -1.0), "noise_std"),
        (lambda: toy.linear_posterior(tree_a64, torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64), 0.0), "full column rank"),
        (
            lambda: toy.linear_posterior(tree_a64, torch.ones(2, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), 0.0),
            "not in the range of A",
        ),
        (lambda: toy.linear_posterior(toy.conditional_tree(), A, y, 0.1), "toy Gaussian-mixture world"),
    ]
    for make, message in bad:
        with pytest.raises(GuidelabError, match=message):
            make()
