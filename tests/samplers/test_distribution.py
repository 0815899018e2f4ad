"""Deterministic samplers with the exact denoiser reproduce the exact distribution: started from exact
samples of p(x; sigma_max), their outputs are as close (sliced Wasserstein) to exact data samples as
a second exact sample set is."""

import pytest
import torch

from guidelab import samplers, schedules
from guidelab.metrics import sliced_wasserstein

N, SIGMA_MAX = 1024, 5.0


@pytest.fixture(scope="module")
def sets(tree_a64):
    exact = [tree_a64.sample(N, 0.0, torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    x_T = tree_a64.sample(N, SIGMA_MAX, torch.Generator().manual_seed(4))
    noise_floor = sum(sliced_wasserstein(a, b) for a, b in [(exact[0], exact[1]), (exact[0], exact[2]), (exact[1], exact[2])]) / 3
    return exact, x_T, noise_floor


def _distance(y, exact):
    return sum(sliced_wasserstein(y, e) for e in exact) / len(exact)


@pytest.mark.parametrize(
    "name, steps, kw",
    [
        ("heun", 32, {}),
        ("dpmpp_2m", 32, {}),
        ("lms", 32, {}),
        ("dpm_2", 16, {}),
        ("unipc", 16, {"order": 3}),
    ],
)
def test_reproduces_exact_distribution(tree_a64, sets, name, steps, kw):
    exact, x_T, floor = sets
    y = samplers.get(name)(tree_a64, x_T.clone(), schedules.karras(steps, 0.002, SIGMA_MAX), **kw)
    assert _distance(y, exact) < 1.5 * floor, (_distance(y, exact), floor)


def test_too_few_steps_is_detected(tree_a64, sets):
    """The bound above is tight enough to fail: 4 Euler steps land far from the data."""
    exact, x_T, floor = sets
    y = samplers.euler(tree_a64, x_T.clone(), schedules.karras(4, 0.002, SIGMA_MAX))
    assert _distance(y, exact) > 3 * floor
