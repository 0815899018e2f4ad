"""Flow matching as an EDM denoiser: guidelab's Euler on the flow scheduler's grid equals diffusers'
FlowMatchEulerDiscreteScheduler loop (shift, dynamic shift); the map's identities; refused settings."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from guidelab import samplers  # noqa: E402
from guidelab.errors import GuidelabError  # noqa: E402
from guidelab.integrations.diffusers import flow  # noqa: E402

torch.manual_seed(0)
W = torch.randn(4, 4) * 0.5


def velocity(x_t, timestep):
    """A nonlinear toy velocity field [B, 4, 2, 2] -> same, depending on the timestep."""
    h = torch.einsum("ij,bjhw->bihw", W.to(x_t), x_t)
    return torch.tanh(h + timestep.to(x_t)[:, None, None, None] / 1000) - 0.3 * x_t


def diffusers_loop(config, steps, latents, mu=None):
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(steps, mu=mu)
    x = latents.clone()
    for t in sched.timesteps:
        v = velocity(x, t.expand(x.shape[0]))
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize(
    "config,mu",
    [({"shift": 3.0}, None), ({"shift": 1.0}, None), ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, 0.8)],
)
def test_euler_equals_flow_match_euler(config, mu):
    latents = torch.randn(3, 4, 2, 2)
    steps = 7
    ref = diffusers_loop(config, steps, latents, mu)
    sig = flow.flow_sigmas(config, steps, mu=mu)
    assert sig[0] == flow.SIGMA_T1 and sig[-1] == 0
    den = flow.FlowDenoiser(velocity)
    x = latents.to(flow.STATE_DTYPE) * (1 + sig[0])  # x = x_t / (1 - t)
    out = samplers.get("euler")(den, x, sig)
    assert (out.float() - ref).abs().max() < 1e-5


def test_map_identities():
    t = torch.tensor([0.0, 0.25, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(flow.to_t(flow.to_sigma(t)), t)
    assert flow.to_sigma(torch.tensor([1.0]))[0] == flow.SIGMA_T1
    # D recovers x0 exactly when the velocity is the true eps - x0
    x0, eps = torch.randn(2, 4, 2, 2, dtype=torch.float64), torch.randn(2, 4, 2, 2, dtype=torch.float64)
    sigma = torch.tensor([0.5, 3.0], dtype=torch.float64)
    den = flow.FlowDenoiser(lambda x_t, ts: eps - x0, dtype=torch.float64)
    assert torch.allclose(den(x0 + sigma[:, None, None, None] * eps, sigma), x0)


def test_flux_mu_matches_diffusers():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert flow.flux_mu(1024, {}) == pytest.approx(calculate_shift(1024))


def test_refused_settings():
    with pytest.raises(GuidelabError, match="stochastic_sampling"):
        flow.flow_sigmas({"stochastic_sampling": True}, 4)
    with pytest.raises(GuidelabError, match="mu"):
        flow.flow_sigmas({"use_dynamic_shifting": True}, 4)
