import math

import pytest
import torch

from guidelab import metrics, toy
from guidelab.errors import GuidelabError


def test_knn_radii_on_a_line():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    torch.testing.assert_close(metrics.knn_radii(x, 1), torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(metrics.knn_radii(x, 2), torch.tensor([3.0, 2.0, 3.0, 6.0], dtype=torch.float64))


def test_precision_recall_separate_quality_from_variation():
    g = torch.Generator().manual_seed(0)
    A = toy.tree("A")
    real, same = A.sample(3000, generator=g), A.sample(3000, generator=g)
    p, r = metrics.precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    # Mode dropping: only the lower half of the tree -> precision stays high, recall falls.
    half = A.sample(12000, generator=g)
    half = half[half[:, 1] < 0.35][:3000]
    p, r = metrics.precision_recall(real, half)
    assert p > 0.9 and r < 0.75
    # Off-manifold samples: precision falls.
    p, r = metrics.precision_recall(real, same + 0.15)
    assert p < 0.5


def test_sliced_wasserstein_of_a_shift():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    delta = torch.tensor([0.3, -0.4], dtype=torch.float64)
    # W2 between a set and its translate, on direction theta, is |delta . theta| for any set size (only the
    # 1000 directions sample the circle: error 0.006); mean over the circle: |delta|^2 / 2.
    sw = metrics.sliced_wasserstein(a, a + delta, n_proj=1000)
    assert abs(sw - 0.5 / math.sqrt(2)) < 0.01
    assert metrics.sliced_wasserstein(a, a) == 0.0
    # Unequal sizes go through quantiles (error 0.002 at 2000 vs 750 points, 0.004 at 4000 vs 1500).
    assert abs(metrics.sliced_wasserstein(a, (a + delta)[:750], n_proj=1000) - 0.5 / math.sqrt(2)) < 0.02


def test_mmd_separates_distributions():
    g = torch.Generator().manual_seed(2)
    A, B = toy.tree("A"), toy.tree("B")
    a1, a2, b = A.sample(1500, generator=g), A.sample(1500, generator=g), B.sample(1500, generator=g)
    same, diff = metrics.mmd(a1, a2), metrics.mmd(a1, b)
    assert abs(same) < 0.05 * diff and diff > 0.5


def test_mean_logp_uses_the_exact_density(tree_a64):
    x = tree_a64.sample(100, generator=torch.Generator().manual_seed(3))
    assert metrics.mean_logp(tree_a64, x) == pytest.approx(tree_a64.logp(x).mean().item())


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.precision_recall(torch.zeros(10, 2), torch.zeros(10, 3)),
        lambda: metrics.precision_recall(torch.zeros(10), torch.zeros(10)),
        lambda: metrics.precision_recall(torch.zeros(3, 2), torch.zeros(10, 2), k=3),
        lambda: metrics.sliced_wasserstein(torch.full((4, 2), math.nan), torch.zeros(4, 2)),
    ],
)
def test_bad_input(call):
    with pytest.raises(GuidelabError):
        call()
