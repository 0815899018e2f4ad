import numpy as np
import pytest
import scipy.linalg
import torch

from guidelab.errors import GuidelabError
from guidelab.metrics import FeatureStats, fid_from_stats, frechet_distance


def _scipy_fd(mu1, s1, mu2, s2):
    """The pytorch-fid / clean-fid formula: scipy.linalg.sqrtm of the product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _stats(rng, n, d, shift=0.0):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + shift
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


@pytest.mark.parametrize("d", [1, 5, 32])
def test_equals_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, s1 = _stats(rng, 4 * d + 10, d)
    mu2, s2 = _stats(rng, 4 * d + 10, d, shift=0.3)
    ref = _scipy_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    # torch inputs (float32 too) give the same answer as numpy float64
    t = [torch.from_numpy(a) for a in (mu1, s1, mu2, s2)]
    assert frechet_distance(*t) == pytest.approx(ref, rel=1e-6)


def test_rank_deficient_covariance_matches_scipy():
    # fewer samples than dimensions: singular covariances, where the clipping of round-off matters
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((10, 24)), rng.standard_normal((12, 24)) + 0.1
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*args) == pytest.approx(_scipy_fd(*args), rel=1e-6)


def test_eigh_path_equals_cholesky_path(monkeypatch):
    # S1 = R R^T with R the Cholesky factor or S1^(1/2) from eigh: both similar to S1 S2
    rng = np.random.default_rng(3)
    args = (*_stats(rng, 60, 12), *_stats(rng, 60, 12, shift=0.2))
    ref = _scipy_fd(*args)
    assert frechet_distance(*args) == pytest.approx(ref, rel=1e-6)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a: (a, torch.tensor(1)))  # as if S1 were singular
    assert frechet_distance(*args) == pytest.approx(ref, rel=1e-6)


def test_one_dimensional_closed_form_and_identity():
    # W2^2 of two 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2
    d = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]]))
    assert d == pytest.approx(1.5**2 + (2 - 0.5) ** 2, rel=1e-12)
    rng = np.random.default_rng(1)
    mu, s = _stats(rng, 50, 6)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9


def test_bad_inputs():
    with pytest.raises(GuidelabError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(GuidelabError, match="NaN"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_stats_merge_equals_one_shot():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 7)) * 3 + 5
    one = FeatureStats(7).update(x)
    shards = [FeatureStats(7).update(torch.from_numpy(c)) for c in np.array_split(x, [17, 150, 151])]
    merged = shards[0] + shards[1]
    merged.merge(shards[2]).merge(shards[3])
    assert merged.count == one.count == 300
    torch.testing.assert_close(merged.mean, one.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.cov, one.cov, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(one.cov.numpy(), np.cov(x, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(one.mean.numpy(), x.mean(0), rtol=1e-12)
    back = FeatureStats.from_state_dict(merged.state_dict())
    assert back.count == 300 and torch.equal(back.outer, merged.outer)
    y = rng.standard_normal((200, 7))
    other = FeatureStats(7).update(y)
    ref = _scipy_fd(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert fid_from_stats(one, other) == pytest.approx(ref, rel=1e-6)


def test_stats_errors():
    with pytest.raises(GuidelabError, match=r"\[N, 3\]"):
        FeatureStats(3).update(np.zeros((4, 2)))
    with pytest.raises(GuidelabError, match="empty"):
        _ = FeatureStats(3).mean
