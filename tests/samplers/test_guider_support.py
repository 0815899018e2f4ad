"""Samplers declare the features they support (``samplers.info(name).supports``) and refuse a guider whose
``requires`` they cannot honour, naming the samplers that can; CFG++ is never silently plain CFG."""

import pytest
import torch

from guidelab import guidance as G
from guidelab import samplers, schedules, toy
from guidelab.errors import GuidelabError
from guidelab.guidance import fkc_sample, superdiff, tfg_sample
from guidelab.rng import SampleNoise

W = toy.conditional_tree(dtype=torch.float64)
SIG = schedules.karras(6, 0.05, 5.0, dtype=torch.float64)
X = W.world(2).sample(8, 5.0, generator=torch.Generator().manual_seed(0))
COND = {"label": torch.arange(8) % 2}
RENOISE = ["euler", "euler_ancestral", "ddim", "ddpm", "dpmpp_2m", "dpmpp_2s_ancestral", "heun"]


def _run(name, den, **kw):
    if name == "dpm_solver_v3":
        kw = {"ems": "degenerate", **kw}  # its statistics: the degenerate ones, by name
    return samplers.get(name)(den, X, SIG, cond=COND, noise=SampleNoise(range(8)), **kw)


def test_the_declared_support_table():
    for name in samplers.names():
        assert isinstance(samplers.info(name).supports, frozenset)
    assert sorted(n for n in samplers.names() if "renoise" in samplers.info(n).supports) == sorted(RENOISE)


@pytest.mark.parametrize("name", samplers.names())
def test_cfgpp_runs_exactly_where_declared_and_is_never_plain_cfg(name):
    """Old code: heun, dpm_2, lms, unipc, dpmpp_2s_ancestral, dpmpp_2m_sde, dpmpp_3m_sde ran cfgpp(D, 0.6) as
    cfg(D, 0.6), bit for bit, with no error."""
    g = G.cfgpp(W, 0.6)
    if "renoise" not in samplers.info(name).supports:
        with pytest.raises(
            GuidelabError, match=f"cfgpp needs a sampler with the renoise step: {', '.join(sorted(RENOISE))}; got {name}"
        ):
            _run(name, g)
        # wrappers propagate the need and are refused alike
        for wrapped in (G.interval(g, 0.1, 10.0), G.epsilon_scaling(g, 1.01)):
            with pytest.raises(GuidelabError, match="renoise step"):
                _run(name, wrapped)
    else:
        out = _run(name, g)
        assert (out - _run(name, G.cfg(W, 0.6))).abs().max() > 1e-3
    # guiders without needs and plain denoisers run on every sampler
    assert torch.isfinite(_run(name, G.cfg(W, 2.0))).all() and torch.isfinite(_run(name, W)).all()


def test_dpmpp_2m_sde_at_eta_0_is_refused_too():
    """Support is a property of the sampler, not of its options: CFG++ under the 2M ODE is dpmpp_2m."""
    with pytest.raises(GuidelabError, match="got dpmpp_2m_sde"):
        _run("dpmpp_2m_sde", G.cfgpp(W, 0.6), eta=0.0)


def test_rules_and_compose_refuse_cfgpp_instead_of_dropping_it():
    g = G.cfgpp(W, 0.6)
    for make in (lambda: G.rescale(g), lambda: G.apg(g), lambda: G.cfg_zero_star(g)):
        with pytest.raises(GuidelabError, match="cannot honour cfgpp's renoise step"):
            make()
    with pytest.raises(GuidelabError, match="compose cannot honour cfgpp"):
        G.compose(g, G.cfg(W, 2.0))


def test_sampler_like_methods_refuse_cfgpp():
    g = G.cfgpp(W, 0.6)
    with pytest.raises(GuidelabError, match="got fkc_sample"):
        fkc_sample(g, X, SIG, cond=COND)
    with pytest.raises(GuidelabError, match="got tfg_sample"):
        tfg_sample(g, X, SIG, lambda y: -y.square().sum(1), cond=COND)
    with pytest.raises(GuidelabError, match="got superdiff"):
        superdiff(g, W, X, SIG, cond=COND)


def test_a_non_callable_is_refused():
    with pytest.raises(GuidelabError, match="needs a denoiser"):
        samplers.euler("not a denoiser", X, SIG)
