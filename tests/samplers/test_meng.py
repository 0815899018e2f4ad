"""Meng et al.'s stochastic sampler: with the exact denoiser it samples the exact distribution (sliced
Wasserstein to exact samples as small as between two exact sets, as test_distribution.py), it is
stochastic with per-sample noise and batch-size invariant, and it costs 1 NFE per step."""

import pytest
import torch

from guidelab import samplers, schedules
from guidelab.metrics import sliced_wasserstein
from guidelab.rng import SampleNoise

N, SIGMA_MAX = 1024, 5.0


@pytest.fixture(scope="module")
def sets(tree_a64):
    exact = [tree_a64.sample(N, 0.0, torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    x_T = tree_a64.sample(N, SIGMA_MAX, torch.Generator().manual_seed(4))
    pairs = [(exact[0], exact[1]), (exact[0], exact[2]), (exact[1], exact[2])]
    return exact, x_T, sum(sliced_wasserstein(a, b) for a, b in pairs) / 3


def _distance(y, exact):
    return sum(sliced_wasserstein(y, e) for e in exact) / len(exact)


def test_reproduces_exact_distribution(tree_a64, sets):
    exact, x_T, floor = sets
    y = samplers.meng_stochastic(tree_a64, x_T.clone(), schedules.karras(32, 0.002, SIGMA_MAX), noise=SampleNoise(range(N)))
    assert _distance(y, exact) < 1.5 * floor, (_distance(y, exact), floor)
    # the bound can fail: 3 steps land far from the data
    y3 = samplers.meng_stochastic(tree_a64, x_T.clone(), schedules.karras(3, 0.002, SIGMA_MAX), noise=SampleNoise(range(N)))
    assert _distance(y3, exact) > 3 * floor


def test_batch_invariant_per_sample_noise_and_one_nfe_per_step(tree_a64):
    calls = []

    def counted(x, s):
        calls.append(1)
        return tree_a64(x, s)

    sig = schedules.karras(8, 0.002, SIGMA_MAX)
    x = tree_a64.sample(12, SIGMA_MAX, torch.Generator().manual_seed(0))
    big = samplers.meng_stochastic(counted, x.clone(), sig, noise=SampleNoise(range(12)))
    assert len(calls) == 8
    small = samplers.meng_stochastic(tree_a64, x[4:7].clone(), sig, noise=SampleNoise(range(4, 7)))
    assert torch.equal(big[4:7], small)
    other = samplers.meng_stochastic(tree_a64, x.clone(), sig, noise=SampleNoise(range(100, 112)))
    assert (other - big).abs().max() > 1e-3  # the noise matters
    assert (samplers.ddim(tree_a64, x.clone(), sig) - big).abs().max() > 1e-3  # not plain DDIM


def test_step_is_ddim_twice_as_long_then_forward_noise():
    """One step on a Gaussian world, by hand: DDIM from sigma_0 to sigma_2, then noise of std
    sqrt(sigma_1^2 - sigma_2^2) back to sigma_1."""
    mu, sd = 0.3, 0.5

    def den(x, s):
        return (x * sd**2 + mu * s[:, None] ** 2) / (sd**2 + s[:, None] ** 2)

    sig = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.tensor([[1.5], [-2.0]], dtype=torch.float64)
    got = {}
    samplers.meng_stochastic(
        den, x.clone(), sig, noise=lambda s, s2: torch.ones_like(x), callback=lambda d: got.setdefault(d["i"], d["x"])
    )
    D0 = den(x, torch.full((2,), 4.0, dtype=torch.float64))
    expect = D0 + (1.0 / 4.0) * (x - D0) + (2.0**2 - 1.0**2) ** 0.5
    assert torch.allclose(got[1], expect, rtol=0, atol=1e-14)
