"""Bad input is a one-line GuidelabError that says what is allowed."""

import pytest
import torch

from guidelab import samplers, schedules
from guidelab.errors import GuidelabError
from guidelab.rng import SampleNoise
from guidelab.samplers import BrownianNoise


def denoiser(x, sigma):
    return x / (1 + sigma[:, None] ** 2)


X = torch.zeros(4, 2, dtype=torch.float64)
GOOD = schedules.karras(5, 0.01, 10.0)
#: the one sampler that needs a model input: dpm_solver_v3's statistics (here the degenerate ones, by name)
KW = {"dpm_solver_v3": {"ems": "degenerate"}}
BAD = {
    "not decreasing": (torch.tensor([1.0, 2.0, 0.0]), "strictly decreasing"),
    "repeated": (torch.tensor([2.0, 2.0, 0.0]), "strictly decreasing"),
    "no final 0": (torch.tensor([3.0, 2.0, 1.0]), "end in 0"),
    "too short": (torch.tensor([0.0]), "at least 2"),
    "2-D": (torch.tensor([[3.0, 0.0]]), "1-D"),
    "nan": (torch.tensor([3.0, float("nan"), 0.0]), "finite"),
}


@pytest.mark.parametrize("name", samplers.names())
@pytest.mark.parametrize("case", BAD)
def test_bad_sigmas(name, case):
    sigmas, message = BAD[case]
    with pytest.raises(GuidelabError, match=message):
        samplers.get(name)(denoiser, X, sigmas)


@pytest.mark.parametrize("name", samplers.names())
def test_every_sampler_runs_and_checks_x(name):
    noise = SampleNoise(range(4)) if samplers.info(name).stochastic else None
    out = samplers.get(name)(denoiser, X + 1, GOOD, noise=noise, **KW.get(name, {}))
    assert out.shape == X.shape and torch.isfinite(out).all()
    with pytest.raises(GuidelabError, match="NaN"):
        samplers.get(name)(denoiser, X + float("nan"), GOOD, **KW.get(name, {}))


def test_unknown_name_lists_known():
    with pytest.raises(GuidelabError, match="unknown sampler 'dpmpp_9m'.*heun"):
        samplers.get("dpmpp_9m")
    with pytest.raises(GuidelabError):
        samplers.info("nope")
    assert samplers.names() == sorted(samplers.names()) and len(samplers.names()) == 17


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: samplers.unipc(denoiser, X, GOOD, order=4), "order must be 1, 2 or 3"),
        (lambda: samplers.unipc(denoiser, X, GOOD, variant="bh3"), "variant"),
        (lambda: samplers.lms(denoiser, X, GOOD, order=0), "order"),
        (lambda: samplers.euler_ancestral(denoiser, X, GOOD, eta=-1.0), "eta"),
        (lambda: samplers.dpmpp_2m_sde(denoiser, X, GOOD, solver_type="rk4"), "solver_type"),
        (lambda: samplers.ddpm(denoiser, X, GOOD, variance="medium"), "variance"),
        (lambda: samplers.score_sde_pc(denoiser, X, GOOD, corrector_steps=-1), "corrector_steps"),
        (lambda: samplers.score_sde_pc(denoiser, X, GOOD, noise=BrownianNoise(range(4))), "BrownianNoise"),
        (lambda: samplers.euler_ancestral(denoiser, X, GOOD, noise=SampleNoise(range(3))), "batch 4"),
        (lambda: samplers.dpmpp_2m_sde(denoiser, X, GOOD, noise=BrownianNoise(range(5))), "batch 4"),
        (lambda: samplers.euler_ancestral(denoiser, X, GOOD, noise="seed"), "noise must be"),
    ],
)
def test_bad_options(call, message):
    with pytest.raises((GuidelabError, ValueError), match=message):
        call()


@pytest.mark.parametrize("name", samplers.names())
def test_one_signature(name):
    """Users switch samplers by name: every one takes (denoiser, x, sigmas, *, cond, callback, progress, noise)."""
    import inspect

    params = inspect.signature(samplers.get(name)).parameters
    assert list(params)[:3] == ["denoiser", "x", "sigmas"]
    for key in ("cond", "callback", "progress", "noise"):
        assert params[key].kind is inspect.Parameter.KEYWORD_ONLY and params[key].default in (None, False)


@pytest.mark.parametrize("name", samplers.names())
def test_no_autograd_graph(name):
    """Samplers run under no_grad: a network with trainable weights builds no graph across steps."""
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    out = samplers.get(name)(lambda x, s: denoiser(x, s) * w, X + 1, GOOD, noise=SampleNoise(range(4)), **KW.get(name, {}))
    assert not out.requires_grad
