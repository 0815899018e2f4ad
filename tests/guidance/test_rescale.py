"""Guidance rescale (Lin et al. 2024, eqs. 15-17) on an exact world of 16-pixel "images".

The world: images ``a * sin(2 pi i / 16) + 0.1 n`` with contrast ``a`` = 0.6 (bright class) or 0.3
(dim class). The conditional model is imperfect like a trained one (bright 0.8, dim 0.2), the
unconditional one is 0.5 / 0.5. High-weight CFG over-saturates (per-sample std above any image of
the data); rescale brings the std back to the conditional model's. Everything is exact.
"""

import math

import pytest
import torch

from guidelab import guidance as G
from guidelab import samplers, schedules
from guidelab.guidance._spaces import to_space
from guidelab.toy import GaussianMixture

D_PIX = 16
SIG = schedules.karras(32, 0.002, 5.0)


def _world(phi_bright):
    i = torch.arange(D_PIX, dtype=torch.float64)
    pattern = torch.sin(2 * math.pi * i / D_PIX)
    cov = (0.1**2 * torch.eye(D_PIX, dtype=torch.float64))[None].repeat(2, 1, 1)
    return GaussianMixture([phi_bright, 1 - phi_bright], torch.stack([0.6 * pattern, 0.3 * pattern]), cov, dtype=torch.float64)


COND, UNCOND, BRIGHT = _world(0.8), _world(0.5), _world(1 - 1e-9)


def _contrast(x):
    """Mean per-sample std over pixels (the image contrast rescale controls)."""
    return float(x.std(1).mean())


@pytest.fixture(scope="module")
def start():
    return torch.randn(128, D_PIX, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5


def test_rescale_undoes_the_over_saturation_of_high_weight_cfg(start):
    cond = _contrast(samplers.heun(COND, start, SIG))
    bright = _contrast(BRIGHT.sample(1024, 0.0, generator=torch.Generator().manual_seed(1)))
    cfg = _contrast(samplers.heun(G.cfg(COND, 8.0, uncond=UNCOND), start, SIG))
    assert cfg > bright > cond  # CFG: more contrast than any data image
    full = _contrast(samplers.heun(G.rescale(G.cfg(COND, 8.0, uncond=UNCOND), 1.0, space="x0"), start, SIG))
    part = _contrast(samplers.heun(G.rescale(G.cfg(COND, 8.0, uncond=UNCOND), 0.7, space="x0"), start, SIG))
    assert abs(full - cond) < 0.05 * (cfg - cond)  # phi = 1: the conditional model's contrast
    assert cond < part < cfg  # phi = 0.7: in between (eq. 17)
    v = _contrast(samplers.heun(G.rescale(G.cfg(COND, 8.0, uncond=UNCOND), 0.7), start, SIG))
    assert v < cfg  # the paper's v space lowers it too, less


@pytest.mark.parametrize("space", ["x0", "eps", "v"])
@pytest.mark.parametrize("phi", [0.7, 1.0])
def test_each_evaluation_mixes_the_stds_exactly(start, space, phi):
    """Eq. 16-17 scale y_cfg by one number per sample, so std(y) = phi std(y_c) + (1 - phi) std(y_cfg)
    exactly, at every evaluation along a high-weight trajectory (per sample, in the guider's space)."""
    seen = []
    guided = G.rescale(G.cfg(COND, 8.0, uncond=UNCOND), phi, space=space)

    def spy(x, sigma):
        seen.append((x, sigma))
        return guided(x, sigma)

    samplers.heun(spy, start[:16], SIG)
    assert len(seen) == 2 * (len(SIG) - 1) - 1  # Heun: no second evaluation at sigma = 0
    for x, sigma in seen[::7]:
        y_c, y_u = (to_space(D(x, sigma), x, sigma, space) for D in (COND, UNCOND))
        y_cfg = y_u + 8.0 * (y_c - y_u)
        y = to_space(guided(x, sigma), x, sigma, space)
        torch.testing.assert_close(y.std(1), phi * y_c.std(1) + (1 - phi) * y_cfg.std(1), rtol=1e-9, atol=1e-12)
