import math

import pytest
import torch

from guidelab.errors import GuidelabError
from guidelab.training import PowerEMA, gamma_to_sigma_rel, power_beta, sigma_rel_to_gamma


@pytest.mark.parametrize("sigma_rel", [0.005, 0.010, 0.05, 0.1, 0.2, 0.28])
def test_sigma_rel_gamma_round_trip(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    assert math.isclose(gamma_to_sigma_rel(gamma), sigma_rel, rel_tol=1e-9)
    # sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3)) (EDM2 eq. 123)
    assert math.isclose(sigma_rel**2 * (gamma + 2) ** 2 * (gamma + 3), gamma + 1, rel_tol=1e-9)


def test_longer_ema_has_smaller_gamma():
    assert sigma_rel_to_gamma(0.01) > sigma_rel_to_gamma(0.05) > sigma_rel_to_gamma(0.2)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.3, math.nan])
def test_bad_sigma_rel(bad):
    with pytest.raises(GuidelabError):
        sigma_rel_to_gamma(bad)


def test_beta():
    assert power_beta(1, 5.0) == 0.0  # the first step copies the network
    assert math.isclose(power_beta(10, 1.0), 0.9**2)
    with pytest.raises(GuidelabError):
        power_beta(0, 1.0)


def _net(value):
    net = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
    return net


def test_ema_of_constant_sequence_is_the_constant():
    net = _net(0.37)
    ema = PowerEMA(_net(-5.0), (0.01, 0.1))  # starts elsewhere; beta_1 = 0 forgets it
    for t in range(1, 50):
        ema.update(net, t)
    for i in range(2):
        for p in ema.state_dict(i).values():
            torch.testing.assert_close(p, torch.full_like(p, 0.37))


def test_ema_tracks_power_function_profile():
    # The EMA of p_t = t after T steps is the mean of t under weights ~ t^gamma:
    # sum t^(g+1) / sum t^g ~= T (g + 1) / (g + 2) for large T.
    T, sigma_rel = 2000, 0.1
    gamma = sigma_rel_to_gamma(sigma_rel)
    net, ema = _net(0.0).double(), None
    for t in range(1, T + 1):
        with torch.no_grad():
            net.weight.fill_(float(t))
        if ema is None:
            ema = PowerEMA(net, (sigma_rel,))
        ema.update(net, t)
    ts = torch.arange(1, T + 1, dtype=torch.float64)
    expect = (ts ** (gamma + 1)).sum() / (ts**gamma).sum()
    torch.testing.assert_close(
        ema.state_dict(0)["weight"], torch.full((2, 3), expect.item(), dtype=torch.float64), rtol=2e-3, atol=0
    )


def test_state_dict_round_trip():
    ema = PowerEMA(_net(1.0), (0.01, 0.05))
    ema.update(_net(2.0), 3)
    other = PowerEMA(_net(0.0), (0.01, 0.05))
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), other.state_dict().values()))
