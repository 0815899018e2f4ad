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


def test_score_fast_equals_the_full_sum():
    """The tree's line groups (8 equally spaced members of equal weight per branch) let score_fast evaluate
    each member's log-weight as a quadratic in its index: the same exact score as the full sum, over the
    training sigmas, at points far from every component (general path) and in float32."""
    w64 = toy.tree("AB", dtype=torch.float64)
    assert w64._lines
    g = torch.Generator().manual_seed(4)
    sigma = (torch.randn(3000, generator=g, dtype=torch.float64) * 1.5 - 2.3).exp()
    x = w64.sample(3000, sigma, generator=g)
    x[:3] = torch.tensor([[40.0, -40.0], [3.0, 3.0], [-2.0, 1.0]], dtype=torch.float64)
    sigma[:3] = torch.tensor([0.002, 0.01, 1e-3], dtype=torch.float64)
    full, fast = w64.score(x, sigma), w64.score_fast(x, sigma)
    assert ((fast - full).norm(dim=1) <= 1e-9 * full.norm(dim=1)).all()
    w32 = toy.tree("AB")
    err32 = (w32.score_fast(x.float(), sigma.float()).double() - full).norm(dim=1) * sigma
    ref32 = (w32.score(x.float(), sigma.float()).double() - full).norm(dim=1) * sigma
    assert err32.max() <= 2 * ref32.max() + 1e-6  # float32 rounding like the full float32 sum's


def test_score_fast_without_line_groups_is_score():
    phi, mu, Sigma = _random_mixture(2, 32, 8, seed=6)  # groups share covariances, but members are not on lines
    mix = GaussianMixture(phi, mu, Sigma, dtype=torch.float64)
    assert not mix._lines
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(mix.score_fast(x, 0.3), mix.score(x, 0.3))


def test_row_chunks_change_nothing(monkeypatch):
    """The exact evaluation runs in fixed chunks of mixture.ROWS rows (bounded memory at any batch)."""
    from guidelab.toy import mixture

    tree = toy.tree("A")
    g = torch.Generator().manual_seed(5)
    sigma = torch.rand(1000, generator=g) + 0.01
    x = tree.sample(1000, sigma, generator=g)
    whole = tree.logp(x, sigma), tree.denoise(x, sigma), tree.score_fast(x, sigma)
    monkeypatch.setattr(mixture, "ROWS", 97)
    chunked = tree.logp(x, sigma), tree.denoise(x, sigma), tree.score_fast(x, sigma)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    torch.testing.assert_close(whole[2], chunked[2], rtol=1e-6, atol=1e-6)  # (small GEMMs: last bits may differ)


def test_score_fast_workspace_is_invisible():
    """score_fast's temporaries live in one reused per-thread workspace: interleaving batch sizes, dtypes and
    threads changes no value (each call equals the same call made alone, first)."""
    import threading

    w32, w64 = toy.tree("A"), toy.tree("A", dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    sigma = (torch.randn(1500, generator=g) * 1.5 - 2.3).exp()
    x = w32.sample(1500, sigma, generator=g)
    calls = [(w32, x, sigma), (w64, x.double(), sigma.double()), (w32, x[:37], sigma[:37]), (w32, x[:600], sigma[:600])]
    first = [w.score_fast(a, s) for w, a, s in calls]
    for (w, a, s), ref in zip(calls[::-1], first[::-1]):
        assert torch.equal(w.score_fast(a, s), ref)
    out: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        for _ in range(3):
            out[i] = calls[i][0].score_fast(calls[i][1], calls[i][2])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(out[i], first[i]) for i in range(len(calls)))
