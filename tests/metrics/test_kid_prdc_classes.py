import itertools
import math

import pytest
import torch

from guidelab.errors import GuidelabError
from guidelab.metrics import class_accuracy, density_coverage, inception_score, kid


def _brute_mmd2(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b/D + 1)^3, written as explicit double sums."""
    m, D = x.shape
    k = lambda a, b: (float(a @ b) / D + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_one_full_subset_equals_double_sum():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.5
    mean, std = kid(x, y, subsets=1, subset_size=7)
    assert mean == pytest.approx(_brute_mmd2(x, y), rel=1e-10) and std == 0.0


def test_kid_separates_distributions_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(200, 4, generator=g) for _ in range(3))
    same = kid(a, b, subsets=10, subset_size=100)
    far = kid(a, c + 1.0, subsets=10, subset_size=100)
    assert abs(same[0]) < 3 * same[1] + 1e-3  # unbiased: zero within noise for equal distributions
    assert far[0] > 10 * abs(same[0]) and far[0] > 5 * far[1]
    assert kid(a, c + 1.0, subsets=10, subset_size=100) == far
    with pytest.raises(GuidelabError, match="dimensions"):
        kid(a, torch.randn(10, 3))


def test_density_coverage_known_cases():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(200, 3, generator=g)
    # fake = real: each ball B_i holds its centre and its k neighbours -> density (k+1)/k, coverage 1
    d, c = density_coverage(real, real.clone(), k=5)
    assert d == pytest.approx(6 / 5) and c == 1.0
    d, c = density_coverage(real, real + 100.0, k=5)
    assert d == 0.0 and c == 0.0
    # points 0..9 on a line, k=2: radii 2 at the ends, 1 inside; a fake at 0.5 lies in B_0 and B_1 only
    line = torch.arange(10.0)[:, None]
    d, c = density_coverage(line, torch.tensor([[0.5]]), k=2)
    assert d == pytest.approx(2 / 2) and c == pytest.approx(2 / 10)


def test_inception_score_known_cases():
    C = 8
    onehot = torch.eye(C).repeat(5, 1)  # confident and evenly spread over C classes
    assert inception_score(onehot, splits=1)[0] == pytest.approx(C)
    assert inception_score(onehot, splits=5) == (pytest.approx(C), pytest.approx(0.0))
    same = torch.softmax(torch.randn(1, C), 1).repeat(40, 1)  # no information in x: IS = 1
    assert inception_score(same, splits=4)[0] == pytest.approx(1.0)
    # two classes, p(y|x) = (q, 1-q) and (1-q, q) half the time each: IS = exp(log 2 - H(q))
    q = 0.9
    p = torch.tensor([[q, 1 - q], [1 - q, q]]).repeat(10, 1)
    H = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    assert inception_score(p, splits=1)[0] == pytest.approx(math.exp(math.log(2) - H))
    with pytest.raises(GuidelabError, match="softmax"):
        inception_score(torch.randn(10, 3))


def test_class_accuracy():
    x = torch.tensor([[1.0], [-2.0], [3.0], [-0.5]])
    clf = lambda x: torch.cat([-x, x], 1)  # noqa: E731 -- class 1 iff x > 0
    assert class_accuracy(clf, x, [1, 0, 1, 1], batch=3) == pytest.approx(0.75)
    assert class_accuracy(clf, x, 1) == pytest.approx(0.5)
    with pytest.raises(GuidelabError, match="labels"):
        class_accuracy(clf, x, [1, 0])
