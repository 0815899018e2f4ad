"""Schedules: closed-form values, shapes, grids and snapping; bad input is a GuidelabError."""

import math

import pytest
import torch

from guidelab import schedules
from guidelab.errors import GuidelabError


def _valid(s, n):
    assert s.shape == (n + 1,) and s.dtype == torch.float64 and float(s[-1]) == 0
    assert bool((s[1:] < s[:-1]).all())


@pytest.mark.parametrize(
    "make",
    [
        lambda n: schedules.karras(n, 0.002, 80.0),
        lambda n: schedules.exponential(n, 0.002, 80.0),
        lambda n: schedules.polyexponential(n, 0.002, 80.0, rho=2.0),
        lambda n: schedules.vp(n),
        lambda n: schedules.cosine(n, 0.002, 80.0),
        lambda n: schedules.logsnr(n, -8.0, 12.0),
    ],
)
def test_shapes_and_ends(make):
    for n in (1, 2, 17):
        s = make(n)
        assert s.shape == (n + 1,) and float(s[-1]) == 0
        if n > 1:
            _valid(s, n)


def test_karras_ends_and_rho():
    s = schedules.karras(10, 0.002, 80.0, rho=7.0)
    assert math.isclose(s[0], 80.0) and math.isclose(s[-2], 0.002)
    ramp = (s[:-1] ** (1 / 7)).diff()  # uniform in sigma^(1/rho)
    assert torch.allclose(ramp, ramp[0].expand_as(ramp))


def test_exponential_family():
    e = schedules.exponential(12, 0.01, 20.0)
    assert torch.allclose(e[:-1].log().diff(), e[:-1].log().diff()[0].expand(11))
    assert torch.allclose(schedules.polyexponential(12, 0.01, 20.0, rho=1.0), e)
    lam = -2 * e[:-1].log()  # log-SNR of the EDM sigma
    assert torch.allclose(schedules.logsnr(12, float(lam[0]), float(lam[-1])), e)
    p = schedules.polyexponential(12, 0.01, 20.0, rho=3.0)
    assert math.isclose(p[0], 20.0) and math.isclose(p[-2], 0.01) and bool((p[1:-2] < e[1:-2]).all())


def test_vp_closed_form():
    s = schedules.vp(5, beta_d=19.9, beta_min=0.1, eps_s=1e-3)
    t = torch.linspace(1, 1e-3, 5, dtype=torch.float64)
    abar = torch.exp(-19.9 * t**2 / 2 - 0.1 * t)
    assert torch.allclose(s[:-1], ((1 - abar) / abar).sqrt(), rtol=1e-10)


def test_cosine_is_uniform_in_t():
    s = schedules.cosine(9, 0.01, 50.0, s=0.008)
    assert math.isclose(s[0], 50.0, rel_tol=1e-9) and math.isclose(s[-2], 0.01, rel_tol=1e-9)
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    t = 1.008 * 2 / math.pi * torch.acos((f0 / (1 + s[:-1] ** 2)).sqrt()) - 0.008  # alpha_bar = f(t)/f(0)
    assert torch.allclose(t.diff(), t.diff()[0].expand(8), atol=1e-12)


def test_vp_grid_and_discrete():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    grid = schedules.vp_grid(1000)
    assert torch.allclose(grid, ((1 - abar) / abar).sqrt())
    for kind in ("scaled_linear", "cosine"):
        g = schedules.vp_grid(1000, 0.00085, 0.012, kind)
        assert bool((g.diff() > 0).all())
    lead = schedules.discrete(10, grid, "leading")
    assert torch.equal(schedules.timesteps(lead, grid), torch.arange(9, -1, -1) * 100)
    assert torch.equal(
        schedules.timesteps(schedules.discrete(10, grid, "leading", offset=1), grid), torch.arange(9, -1, -1) * 100 + 1
    )
    trail = schedules.timesteps(schedules.discrete(10, grid, "trailing"), grid)
    assert int(trail[0]) == 999 and torch.equal(trail, torch.arange(999, 0, -100))
    lin = schedules.timesteps(schedules.discrete(4, grid, "linspace"), grid)
    assert torch.equal(lin, torch.tensor([999, 666, 333, 0]))
    for spacing in ("leading", "trailing"):
        _valid(schedules.discrete(10, grid, spacing), 10)


def test_snap():
    grid = schedules.vp_grid(1000)
    s = schedules.karras(20, float(grid[0]), float(grid[-1]))
    snapped = schedules.snap(s, grid)
    _valid(snapped, 20)
    t = schedules.timesteps(snapped, grid)
    assert torch.equal(snapped[:-1], grid[t])  # every sigma is a grid sigma
    assert torch.allclose(snapped[:-1].log(), s[:-1].log(), atol=0.2)
    dense = schedules.snap(schedules.karras(3000, float(grid[0]), float(grid[-1])), grid)  # collisions merge
    assert len(dense) <= 1001 and bool((dense[1:] < dense[:-1]).all())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: schedules.karras(0, 0.1, 1.0), "integer >= 1"),
        (lambda: schedules.karras(2.5, 0.1, 1.0), "integer >= 1"),
        (lambda: schedules.exponential(5, 2.0, 1.0), "sigma_min < sigma_max"),
        (lambda: schedules.karras(5, 0.1, 1.0, rho=0), "rho"),
        (lambda: schedules.logsnr(5, 3.0, -3.0), "logsnr_min < logsnr_max"),
        (lambda: schedules.vp_grid(100, kind="quadratic"), "unknown beta schedule"),
        (lambda: schedules.discrete(5, schedules.vp_grid(100), "middle"), "unknown spacing"),
        (lambda: schedules.discrete(500, schedules.vp_grid(100)), "more than the grid"),
        (lambda: schedules.snap(torch.tensor([3.0, 1.0]), schedules.vp_grid(100)), "ending in 0"),
        (lambda: schedules.snap(torch.tensor([3.0, 0.0]), torch.tensor([2.0, 1.0])), "increasing"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(GuidelabError, match=message):
        call()
