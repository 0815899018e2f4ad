"""Every sampler k-diffusion also has gives k-diffusion's result (float64, same denoiser, sigmas, noise)."""

import pytest
import torch

from guidelab import samplers, schedules

B = 32


def _noise_table(n_steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_steps, B, 2, generator=g, dtype=torch.float64)


class Noise:
    """A noise sampler that hands out the same table of draws in order to whoever calls it."""

    def __init__(self, table):
        self.table, self.k = table, 0

    def __call__(self, *args):
        out = self.table[self.k % len(self.table)]
        self.k += 1
        return out


def _start(world, sigma_max, seed=0):
    g = torch.Generator().manual_seed(seed)
    return world.sample(B, sigma_max, g)


SCHEDULES = {
    "karras": lambda: schedules.karras(12, 0.002, 5.0),
    "exponential": lambda: schedules.exponential(9, 0.01, 3.0),
}


@pytest.mark.parametrize("sched", SCHEDULES)
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("euler", {}),
        ("heun", {}),
        ("dpm_2", {}),
        ("lms", {}),
        ("lms", {"order": 2}),
        ("dpmpp_2m", {}),
        ("euler_ancestral", {"eta": 1.0}),
        ("euler_ancestral", {"eta": 0.5, "s_noise": 0.9}),
        ("dpm_2_ancestral", {"eta": 1.0}),
        ("dpmpp_2s_ancestral", {"eta": 0.7}),
        ("dpmpp_2m_sde", {"eta": 1.0}),
        ("dpmpp_2m_sde", {"eta": 0.5, "solver_type": "heun"}),
        ("dpmpp_2m_sde", {"eta": 0.0}),
        ("dpmpp_3m_sde", {"eta": 1.0}),
        ("dpmpp_3m_sde", {"eta": 0.0, "s_noise": 1.1}),
    ],
)
def test_matches_kdiffusion(ksampling, tree_ab64, sched, name, kwargs):
    sigmas = SCHEDULES[sched]()
    x = _start(tree_ab64, float(sigmas[0]))
    table = _noise_table(len(sigmas))
    stochastic = samplers.info(name).stochastic
    extra = {"noise": Noise(table)} if stochastic else {}
    ours = samplers.get(name)(tree_ab64, x.clone(), sigmas, **kwargs, **extra)
    kextra = {"noise_sampler": Noise(table)} if stochastic else {}
    ref = getattr(ksampling, f"sample_{name}")(tree_ab64, x.clone(), sigmas, disable=True, **kwargs, **kextra)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6), (ours - ref).abs().max()
    assert not torch.equal(ours, x)


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2"])
def test_churn_matches_kdiffusion(ksampling, tree_a64, monkeypatch, name):
    """EDM churn (k-diffusion draws it with torch.randn_like once per step; we draw only where gamma > 0)."""
    sigmas = schedules.karras(10, 0.002, 5.0)
    x = _start(tree_a64, 5.0)
    table = _noise_table(len(sigmas))
    index = {float(s): i for i, s in enumerate(sigmas)}
    churn = dict(s_churn=8.0, s_tmin=0.05, s_tmax=2.0, s_noise=1.007)
    ours = samplers.get(name)(tree_a64, x.clone(), sigmas, noise=lambda s, s_next: table[index[s]], **churn)
    draws = Noise(table)
    monkeypatch.setattr(torch, "randn_like", lambda t: draws())
    ref = getattr(ksampling, f"sample_{name}")(tree_a64, x.clone(), sigmas, disable=True, **churn)
    monkeypatch.undo()
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6), (ours - ref).abs().max()
    plain = samplers.get(name)(tree_a64, x.clone(), sigmas)
    assert (ours - plain).abs().max() > 1e-3  # churn did something


def test_callback_and_cond_match_kdiffusion(ksampling, tree_a64):
    """Callbacks see the same (i, sigma, sigma_hat, x, denoised); cond reaches the denoiser as keywords."""
    sigmas = schedules.karras(6, 0.002, 5.0)
    x = _start(tree_a64, 5.0)

    def denoiser(x, sigma, *, shift):
        return tree_a64(x, sigma) + shift

    seen, kseen = [], []
    shift = torch.tensor([0.1, -0.2], dtype=torch.float64)
    ours = samplers.dpmpp_2m(denoiser, x.clone(), sigmas, cond={"shift": shift}, callback=seen.append)
    ref = ksampling.sample_dpmpp_2m(denoiser, x.clone(), sigmas, extra_args={"shift": shift}, callback=kseen.append, disable=True)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert len(seen) == len(kseen) == 6
    for a, b in zip(seen, kseen):
        assert a["i"] == b["i"] and float(a["sigma"]) == float(b["sigma"]) and float(a["sigma_hat"]) == float(b["sigma_hat"])
        assert torch.allclose(a["x"], b["x"], atol=1e-6) and torch.allclose(a["denoised"], b["denoised"], atol=1e-6)


def test_schedules_match_kdiffusion(ksampling):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # k-diffusion builds its ramps in the default dtype
    try:
        pairs = [
            (schedules.karras(10, 0.01, 10.0), ksampling.get_sigmas_karras(10, 0.01, 10.0)),
            (schedules.exponential(10, 0.01, 10.0), ksampling.get_sigmas_exponential(10, 0.01, 10.0)),
            (schedules.polyexponential(10, 0.01, 10.0, rho=2.0), ksampling.get_sigmas_polyexponential(10, 0.01, 10.0, rho=2.0)),
            (schedules.vp(10), ksampling.get_sigmas_vp(10)),
        ]
    finally:
        torch.set_default_dtype(previous)
    for ours, ref in pairs:
        assert torch.allclose(ours, ref, rtol=1e-10, atol=0)
