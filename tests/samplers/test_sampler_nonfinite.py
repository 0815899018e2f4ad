"""A denoiser that turns NaN at step k makes every sampler stop with an error naming the step, sigma and rows."""

import math

import pytest
import torch

from guidelab import samplers, schedules
from guidelab.errors import NonFiniteError
from guidelab.rng import SampleNoise

SIGMAS = schedules.karras(8, 0.01, 5.0, dtype=torch.float64)
K = 4  # the first step whose own sigma gives NaN


class NaNFrom:
    """Zero-mean Gaussian denoiser (exact for N(0, I)) whose row 1 is NaN wherever sigma <= SIGMAS[K]."""

    def __init__(self):
        self.first_nan_sigma = None

    def __call__(self, x, sigma, **cond):
        D = x / (1 + sigma**2)[:, None]
        bad = float(sigma[0]) <= float(SIGMAS[K]) + 1e-12
        if bad:
            if self.first_nan_sigma is None:
                self.first_nan_sigma = float(sigma[0])
            D = D.clone()
            D[1] = math.nan
        return D


@pytest.mark.parametrize("name", samplers.names())
def test_every_sampler_names_the_step_sigma_and_rows(name):
    den = NaNFrom()
    x = SampleNoise([0, 1, 2]).randn([2], torch.float64) * SIGMAS[0]
    with pytest.raises(NonFiniteError) as e:
        kw = {"ems": "degenerate"} if name == "dpm_solver_v3" else {}  # its statistics, by name
        samplers.get(name)(den, x, SIGMAS, noise=SampleNoise([0, 1, 2]), **kw)
    msg = str(e.value)
    assert msg.startswith(f"{name}: ")
    assert f"(sigma {den.first_nan_sigma:g})" in msg
    assert "rows [1]" in msg
    # the step named is the one whose evaluation first gave NaN: step K (its first evaluation, at SIGMAS[K]),
    # or step K - 1 for samplers whose later evaluations of that step reach sigma <= SIGMAS[K] (Heun's at
    # SIGMAS[K], the ancestral midpoints below it) -- never a later step
    step = int(msg.split("at step ")[1].split()[0])
    assert step == K or (step == K - 1 and den.first_nan_sigma <= float(SIGMAS[K]) + 1e-12), msg


def test_allow_nonfinite_opts_out():
    x = SampleNoise([0, 1, 2]).randn([2], torch.float64) * SIGMAS[0]
    with samplers.allow_nonfinite():
        out = samplers.euler(NaNFrom(), x, SIGMAS)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    with pytest.raises(NonFiniteError):  # the check is back outside the context
        samplers.euler(NaNFrom(), x, SIGMAS)
