import pytest
import torch

from guidelab import metrics
from guidelab.errors import GuidelabError
from guidelab.metrics.pointcloud import dist


def _radii(x, k):
    return dist(x, x).kthvalue(k + 1, dim=1).values


def _cov(points, centres, radii):
    return (dist(points, centres) <= radii).any(1).double().mean().item()


def _reference(real, fake, k_pr=3, k_dc=5):
    """The former all-pairs implementation (exact cdist + kthvalue)."""
    real, fake = real.double(), fake.double()
    inside = dist(fake, real) <= _radii(real, k_dc)
    return {
        "precision": _cov(fake, real, _radii(real, k_pr)),
        "recall": _cov(real, fake, _radii(fake, k_pr)),
        "density": inside.sum().item() / (k_dc * fake.shape[0]),
        "coverage": inside.any(0).double().mean().item(),
    }


@pytest.mark.parametrize("budget", [1 << 23, 997])
def test_prdc_equals_all_pairs_reference(budget):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(700, 16, generator=g, dtype=torch.float64)
    fake = torch.randn(500, 16, generator=g, dtype=torch.float64) * 1.1 + 0.2
    fake[:50] = real[:50]  # points exactly on other balls' boundaries
    grid = torch.cartesian_prod(torch.arange(8.0), torch.arange(8.0))  # ties everywhere
    for r, f in ((real, fake), (grid, grid[::3] + 0.5), (grid, grid.clone())):
        got = metrics.prdc(r, f, budget=budget)
        assert got == _reference(r, f)
        assert metrics.precision_recall(r, f, k=3) == (got["precision"], got["recall"])
        assert metrics.density_coverage(r, f, k=5) == (got["density"], got["coverage"])
        assert torch.equal(metrics.knn_radii(r, 4), _radii(r.double(), 4))


def test_real_radii_reused_and_checked():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(300, 4, generator=g), torch.randn(200, 4, generator=g)
    rr = metrics.knn_radii_multi(real, (3, 5))
    assert metrics.prdc(real, fake, real_radii=rr) == metrics.prdc(real, fake)
    with pytest.raises(GuidelabError, match="real_radii"):
        metrics.prdc(real, fake, real_radii={3: rr[3]})
    with pytest.raises(GuidelabError, match="k must be"):
        metrics.knn_radii_multi(real, (300,))
