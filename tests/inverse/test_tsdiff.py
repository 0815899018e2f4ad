"""TSDiff on an exact world of short series: self-guidance moves forecasts toward the exact posterior,
quantile guidance is asymmetric as its pinball loss, refine improves a base forecast, misuse refused."""

import math

import pytest
import torch
from inverse_worlds import SIGMAS

from guidelab import samplers, toy
from guidelab.errors import GuidelabError
from guidelab.inverse import (
    Mask,
    quantile_levels,
    tsdiff_guided,
    tsdiff_refine,
    tsdiff_sigma,
    tsdiff_sigmas,
)
from guidelab.rng import SampleNoise

L, CONTEXT = 8, 6


def _series_world():
    """Three noisy sinusoids (phases 0, 2pi/3, 4pi/3) with a smooth (RBF) covariance: exact series."""
    t = torch.arange(L, dtype=torch.float64)
    mu = torch.stack([0.8 * torch.sin(2 * math.pi * t / 6 + p) for p in (0, 2 * math.pi / 3, 4 * math.pi / 3)])
    K = 0.04 * torch.exp(-0.5 * (t[:, None] - t[None]) ** 2 / 2.0**2) + 0.002 * torch.eye(L, dtype=torch.float64)
    return toy.GaussianMixture(torch.ones(3), mu, K.expand(3, L, L))


@pytest.fixture(scope="module")
def forecast():
    world = _series_world()
    truth = world.sample(1, generator=torch.Generator().manual_seed(3))[0].float()
    mask = torch.arange(L) < CONTEXT
    post = toy.linear_posterior(world, Mask(mask).matrix().float(), truth[mask], 0.0)
    return world, truth, mask, post


def _start(n=128):
    noise = SampleNoise(range(n))
    return noise.randn([L]) * SIGMAS[0], noise


def test_zero_scale_is_ddpm_bit_for_bit(forecast):
    world, truth, mask, _ = forecast
    x, noise = _start(16)
    out = tsdiff_guided(world, x, SIGMAS, truth, mask, scale=0.0, guidance="mse", noise=noise)
    x, noise = _start(16)
    assert torch.equal(out, samplers.euler_ancestral(world, x, SIGMAS, noise=noise))


def test_self_guidance_moves_forecasts_toward_the_exact_posterior(forecast):
    world, truth, mask, post = forecast
    x, noise = _start()
    base = samplers.euler_ancestral(world, x, SIGMAS, noise=noise)
    x, noise = _start()
    out = tsdiff_guided(world, x, SIGMAS, truth, mask, scale=4.0, guidance="mse", noise=noise)
    lp = lambda s: float(post.logp(post.project(s)).median())
    assert lp(out) > lp(base) + 3
    assert float(post.consistency(out).mean()) < 0.3 * float(post.consistency(base).mean())
    # the forecast window: closer to the exact posterior mean than unguided sampling
    future = ~mask
    err = lambda s: float((s[:, future].mean(0) - post.mean()[future]).abs().mean())
    assert err(out) < 0.5 * err(base)


def test_quantile_guidance_is_asymmetric_like_its_pinball_loss(forecast):
    world, truth, mask, _ = forecast
    resid = {}
    for q in (0.1, 0.9):
        x, noise = _start()
        out = tsdiff_guided(world, x, SIGMAS, truth, mask, scale=4.0, guidance="quantile", q=q, noise=noise)
        resid[q] = float((truth[mask] - out[:, mask]).mean())  # y - prediction on the context
    # q = 0.9 penalises predictions below y nine times more: they end above it, and q = 0.1 below
    assert resid[0.9] < 0 < resid[0.1]
    torch.testing.assert_close(quantile_levels(3), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))


def test_refine_improves_a_base_forecast(forecast):
    world, truth, mask, post = forecast
    n = 64
    init = truth.clone().expand(n, L).contiguous()
    init[:, ~mask] = truth[CONTEXT - 6 : CONTEXT - 6 + (L - CONTEXT)]  # seasonal naive: period 6
    init = init + 0.2 * torch.randn(n, L, generator=torch.Generator().manual_seed(0))
    for method in ("most_likely", "lmc"):
        out = tsdiff_refine(
            world, init, truth, mask, method=method, iterations=30, step_size=0.01, sigma=0.2, noise=SampleNoise(range(n))
        )
        assert float(world.logp(out).mean()) > float(world.logp(init).mean()) + 1, method
        assert float(post.consistency(out).mean()) < float(post.consistency(init).mean()), method


def test_schedule_helpers():
    betas = torch.linspace(1e-4, 0.1, 100, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    assert abs(tsdiff_sigma(20) - math.sqrt((1 - abar[20]) / abar[20])) < 1e-9
    s = tsdiff_sigmas()
    assert len(s) == 101 and float(s[-1]) == 0 and bool((s[1:] < s[:-1]).all())


def test_misuse_is_one_clear_error(forecast):
    world, truth, mask, _ = forecast
    x, _ = _start(4)
    y_nan_unobserved = truth.clone()
    y_nan_unobserved[~mask] = float("nan")  # unobserved values may be NaN
    tsdiff_guided(world, x, SIGMAS[-3:], y_nan_unobserved, mask, guidance="mse")
    y_nan = truth.clone()
    y_nan[0] = float("nan")
    cases = [
        (lambda: tsdiff_guided(world, x, SIGMAS, truth, mask, guidance="l1"), "unknown TSDiff guidance"),
        (lambda: tsdiff_guided(world, x, SIGMAS, truth, mask, guidance="quantile"), "needs the quantile level q"),
        (lambda: tsdiff_guided(world, x, SIGMAS, truth, mask, guidance="quantile", q=1.5), "q must be in \\(0, 1\\)"),
        (lambda: tsdiff_guided(world, x, SIGMAS, truth, mask[:4]), "mask must be shaped like one sample"),
        (lambda: tsdiff_guided(world, x, SIGMAS, y_nan, mask), "NaN"),
        (lambda: tsdiff_refine(world, x, truth, mask, method="hmc"), "unknown refine method"),
        (lambda: tsdiff_refine(world, x, truth, mask, step_size=0), "step_size"),
        (lambda: tsdiff_sigma(100), "t must be < timesteps"),
    ]
    for make, message in cases:
        with pytest.raises(GuidelabError, match=message):
            make()
