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


@pytest.mark.parametrize(
    "shape, offset, scale",
    [((400, 2), 0.0, 1.0), ((300, 3), 1e4, 1.0), ((300, 64), -50.0, 1e-3), ((257, 1), 0.0, 1e6), ((200, 300), 3.0, 1.0)],
)
def test_float32_screen_is_exact_far_from_the_origin_and_in_any_dimension(shape, offset, scale):
    """The float32 screen only excludes pairs: values equal the float64 all-pairs reference even for data
    far from the origin (the screen centres it), tiny or huge scales, D = 1 .. 300, duplicates and ties."""
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    real = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset
    fake = torch.randn(*shape, generator=g, dtype=torch.float64) * scale * 1.2 + offset
    fake[:40] = real[:40]  # exactly on ball boundaries
    real[-10:] = real[:10]  # duplicates: zero distances
    for budget in (1 << 22, 1000):
        metrics.knn._CACHE.clear()
        assert metrics.prdc(real, fake, budget=budget) == _reference(real, fake)
        for k in (1, 3, 7):
            assert torch.equal(metrics.knn_radii_multi(real, (k,), budget)[k], _radii(real, k))


def test_ball_pairs_hold_every_pair_inside():
    g = torch.Generator().manual_seed(3)
    pts, ctr = torch.randn(500, 8, generator=g, dtype=torch.float64), torch.randn(300, 8, generator=g, dtype=torch.float64)
    radii = _radii(ctr, 4)
    p, c, d = metrics.knn.ball_pairs(pts, ctr, radii, budget=5000)
    full = dist(pts, ctr)
    assert torch.equal(d, full[p, c])  # exact distances
    inside = full <= radii
    got = torch.zeros_like(inside)
    got[p[d <= radii[c]], c[d <= radii[c]]] = True
    assert torch.equal(got, inside) and len(p) < inside.numel() // 10  # every pair inside, few candidates


def test_real_real_pass_is_done_once_for_both_metrics(monkeypatch):
    g = torch.Generator().manual_seed(4)
    real, fake = torch.randn(300, 4, generator=g), torch.randn(200, 4, generator=g)
    calls = []
    real_knn = metrics.knn._knn
    monkeypatch.setattr(metrics.knn, "_knn", lambda x, ks, b: calls.append(len(x)) or real_knn(x, ks, b))
    metrics.knn._CACHE.clear()
    p, r = metrics.precision_recall(real, fake, k=3)
    d, c = metrics.density_coverage(real, fake, k=5)
    assert calls == [300, 200]  # real-real once (k = 3 and 5 together), fake-fake once
    assert (p, r, d, c) == tuple(_reference(real, fake)[k] for k in ("precision", "recall", "density", "coverage"))
    real2 = real.clone()
    real2[0, 0] += 1e-3  # other bytes: a new pass
    metrics.precision_recall(real2, fake, k=3)
    assert calls == [300, 200, 300, 200]
