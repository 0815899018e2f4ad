"""Per-sample noise: stochastic samplers give bit-identical samples at any batch size; Brownian noise
keeps a run consistent when its schedule is refined."""

import math

import pytest
import torch

from guidelab import samplers, schedules
from guidelab.rng import SampleNoise
from guidelab.samplers import BrownianNoise

MU = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)


def gaussian(x, sigma, sd=0.5):
    """Exact denoiser of N(MU, sd^2 I): element-wise, so itself exactly batch-size invariant."""
    s2 = sigma[:, None] ** 2
    return (x * sd**2 + MU * s2) / (sd**2 + s2)


STOCHASTIC = [
    ("euler_ancestral", {}),
    ("dpm_2_ancestral", {}),
    ("dpmpp_2s_ancestral", {}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp_3m_sde", {}),
    ("ddim", {"eta": 0.5}),
    ("ddpm", {}),
    ("ddpm", {"variance": "large"}),
    ("score_sde_pc", {}),
    ("euler", {"s_churn": 5.0}),
    ("heun", {"s_churn": 5.0}),
    ("dpm_2", {"s_churn": 5.0}),
]


def _run(name, kw, seeds, noise_cls=SampleNoise):
    sigmas = schedules.karras(8, 0.01, 10.0)
    x = SampleNoise(seeds).randn([3], torch.float64) * 10.0
    return samplers.get(name)(gaussian, x, sigmas, noise=noise_cls(seeds), **kw)


@pytest.mark.parametrize("name, kw", STOCHASTIC, ids=[f"{n}-{k}" for n, k in STOCHASTIC])
def test_batch_size_invariant(name, kw):
    seeds = list(range(100, 164))
    full = _run(name, kw, seeds)
    assert torch.equal(_run(name, kw, seeds[:7]), full[:7])
    assert torch.equal(_run(name, kw, seeds[5:6]), full[5:6])
    assert torch.equal(_run(name, kw, seeds[:7][::-1]), full[:7].flip(0))
    # the noise matters: the same start with other seeds for the noise gives other samples
    sigmas = schedules.karras(8, 0.01, 10.0)
    x = SampleNoise(seeds[:7]).randn([3], torch.float64) * 10.0
    other = samplers.get(name)(gaussian, x, sigmas, noise=SampleNoise(range(7)), **kw)
    assert (other - full[:7]).abs().min() > 0


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_3m_sde", "euler_ancestral", "ddim"])
def test_brownian_batch_size_invariant(name):
    kw = {"eta": 1.0}
    seeds = list(range(64))
    full = _run(name, kw, seeds, BrownianNoise)
    assert torch.equal(_run(name, kw, seeds[:7], BrownianNoise), full[:7])
    assert torch.equal(_run(name, kw, seeds[9:10], BrownianNoise), full[9:10])


def test_brownian_increments_add_up():
    """noise(a, c) sqrt(a - c) = noise(a, b) sqrt(a - b) + noise(b, c) sqrt(b - c): one Brownian path."""
    x = torch.zeros(3, 4, dtype=torch.float64)
    ns = BrownianNoise([1, 2, 3]).tree_sampler(x, 10.0)
    a, b, c = 7.0, 2.5, 0.3
    whole = ns(a, c) * math.sqrt(a - c)
    parts = ns(a, b) * math.sqrt(a - b) + ns(b, c) * math.sqrt(b - c)
    assert torch.allclose(whole, parts, atol=1e-9)
    draws = torch.stack([BrownianNoise([s]).tree_sampler(x[:1], 10.0)(5.0, 4.0) for s in range(400)])
    assert abs(draws.mean()) < 0.1 and abs(draws.std() - 1) < 0.1  # standard normal increments


def test_brownian_refinement_is_consistent(tree_a64):
    """With Brownian noise an SDE run refined from 32 to 64 steps moves little; with fresh noise per
    step it lands elsewhere."""
    x = tree_a64.sample(16, 5.0, torch.Generator().manual_seed(0))
    seeds = list(range(16))

    def run(n, noise):
        return samplers.dpmpp_2m_sde(tree_a64, x.clone(), schedules.karras(n, 0.01, 5.0), noise=noise)

    brown = (run(32, BrownianNoise(seeds, sigma_max=5.0)) - run(64, BrownianNoise(seeds, sigma_max=5.0))).norm(dim=1).mean()
    fresh = (run(32, SampleNoise(seeds)) - run(64, SampleNoise(seeds))).norm(dim=1).mean()
    assert brown < 0.3 * fresh, (brown, fresh)
