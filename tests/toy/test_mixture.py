"""GaussianMixture against a direct evaluation (MultivariateNormal per component, float64)."""

import pytest
import torch

from guidelab import toy
from guidelab.errors import GuidelabError
from guidelab.toy import GaussianMixture
from guidelab.toy.tree import _components


def _random_mixture(D, K, group, seed):
    g = torch.Generator().manual_seed(seed)
    phi = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    mu = torch.randn(K, D, generator=g, dtype=torch.float64)
    A = torch.randn(K // group, D, D, generator=g, dtype=torch.float64) * 0.3
    Sigma = (A @ A.transpose(1, 2) + 0.05 * torch.eye(D, dtype=torch.float64)).repeat_interleave(group, 0)
    return phi, mu, Sigma


def _direct_logp(phi, mu, Sigma, x, sigma):
    cov = Sigma[None] + (sigma**2)[:, None, None, None] * torch.eye(mu.shape[1], dtype=x.dtype)
    comp = torch.distributions.MultivariateNormal(mu[None].expand(len(x), -1, -1), covariance_matrix=cov)
    return torch.logsumexp(comp.log_prob(x[:, None]) + (phi / phi.sum()).log(), 1)


@pytest.mark.parametrize("D,K,group", [(2, 24, 8), (3, 12, 4), (3, 10, 1)])
def test_matches_direct_evaluation(D, K, group):
    phi, mu, Sigma = _random_mixture(D, K, group, seed=D + K)
    mix = GaussianMixture(phi, mu, Sigma, dtype=torch.float64, chunk=5)  # several chunks
    assert mix._group == group
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, D, generator=g, dtype=torch.float64) * 2
    sigma = torch.rand(13, generator=g, dtype=torch.float64) + 0.01
    xr = x.clone().requires_grad_(True)
    ref = _direct_logp(phi, mu, Sigma, xr, sigma)
    (ref_score,) = torch.autograd.grad(ref.sum(), xr)
    torch.testing.assert_close(mix.logp(x, sigma), ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mix.score(x, sigma), ref_score, rtol=1e-9, atol=1e-9)


def test_float32_score_close_to_float64():
    phi, mu, Sigma = _random_mixture(2, 32, 8, seed=5)
    m64 = GaussianMixture(phi, mu, Sigma, dtype=torch.float64)
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma = torch.full((300,), 0.2, dtype=torch.float64)
    torch.testing.assert_close(
        m64.to(torch.float32).score(x.float(), sigma.float()).double(), m64.score(x, sigma), rtol=1e-4, atol=1e-4
    )


def test_chunk_size_changes_nothing():
    """Rows are evaluated independently, so the chunk size (default: ~64k terms per chunk) is invisible."""
    tree = toy.tree("AB")
    x = tree.sample(300, 0.1, generator=torch.Generator().manual_seed(2))
    sigma = torch.rand(300, generator=torch.Generator().manual_seed(3)) + 0.01
    for chunk in (7, 256, 300):
        other = GaussianMixture(*_components()[1:], chunk=chunk)
        assert torch.equal(other.logp(x, sigma), tree.logp(x, sigma))
        assert torch.equal(other.denoise(x, sigma), tree.denoise(x, sigma))
    with pytest.raises(GuidelabError, match="chunk"):
        GaussianMixture(*_components()[1:], chunk=0)
