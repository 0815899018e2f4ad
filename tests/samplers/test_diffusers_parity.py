"""ddim, ddpm and unipc against diffusers' schedulers on the same model, timesteps and noise (float64).

The model is the exact tree world seen as a discrete-time VP eps-model: ``x_VP = x / sqrt(1 + sigma_t^2)``,
``eps(x_VP, t) = (x - D(x, sigma_t)) / sigma_t``. Our samplers run in EDM coordinates on
``sigma_t = sqrt((1 - abar_t) / abar_t)`` of the scheduler's timesteps, then 0.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UniPCMultistepScheduler

from guidelab import samplers, schedules

B, T = 16, 1000


def _sigma(abar):
    return ((1 - abar) / abar).sqrt()


def _eps_model(world, sigma_of_t):
    def eps(x_vp, t):
        s = sigma_of_t(t)
        x = x_vp * (1 + s**2).sqrt()
        return (x - world(x, s.expand(x.shape[0]))) / s

    return eps


def _start(world, sigma):
    return world.sample(B, float(sigma), torch.Generator().manual_seed(0))


def _vp_run(sched, eps, x, sigma0, step_kwargs=lambda i: {}):
    x_vp = x / (1 + sigma0**2).sqrt()
    for i, t in enumerate(sched.timesteps):
        x_vp = sched.step(eps(x_vp, int(t)), t, x_vp, **step_kwargs(i)).prev_sample
    return x_vp  # abar = 1 at the end: x_VP = x


@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_matches_diffusers(tree_a64, eta):
    sched = DDIMScheduler(num_train_timesteps=T, clip_sample=False)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.set_timesteps(10)
    abar = sched.alphas_cumprod
    sigmas = torch.cat([_sigma(abar[sched.timesteps]), torch.zeros(1, dtype=torch.float64)])
    x = _start(tree_a64, sigmas[0])
    z = torch.randn(len(sigmas), B, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    index = {float(s): i for i, s in enumerate(sigmas)}
    ours = samplers.ddim(tree_a64, x.clone(), sigmas, eta=eta, noise=lambda s, s_next: z[index[s]])
    ref = _vp_run(
        sched, _eps_model(tree_a64, lambda t: _sigma(abar[t])), x, sigmas[0], lambda i: {"eta": eta, "variance_noise": z[i]}
    )
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6), (ours - ref).abs().max()
    if eta == 0:  # DDIM is Euler on the PF-ODE in EDM coordinates
        assert torch.allclose(ours, samplers.euler(tree_a64, x.clone(), sigmas), atol=1e-10)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_matches_diffusers(tree_a64, variance):
    sched = DDPMScheduler(num_train_timesteps=T, clip_sample=False, variance_type=f"fixed_{variance}")
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.one = sched.one.double()
    sched.set_timesteps(8)
    abar = sched.alphas_cumprod
    assert int(sched.timesteps[-1]) == 0  # the last step (to abar = 1) is noise-free
    sigmas = torch.cat([_sigma(abar[sched.timesteps]), torch.zeros(1, dtype=torch.float64)])
    x = _start(tree_a64, sigmas[0])
    g_ours, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ours = samplers.ddpm(
        tree_a64,
        x.clone(),
        sigmas,
        variance=variance,
        noise=lambda s, s_next: torch.randn(B, 2, generator=g_ours, dtype=torch.float64),
    )
    ref = _vp_run(sched, _eps_model(tree_a64, lambda t: _sigma(abar[t])), x, sigmas[0], lambda i: {"generator": g_ref})
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6), (ours - ref).abs().max()


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_diffusers(tree_a64, variant, order):
    """diffusers' last step to sigma = 0 is first order (lower_order_final): x_0 = D(x, sigma_last) at the
    uncorrected x; with bh1 it computes that as ``- inf * 0`` = NaN, so we stop it one step early and
    take that D ourselves."""
    sched = UniPCMultistepScheduler(num_train_timesteps=T, solver_order=order, solver_type=variant)
    sched.set_timesteps(10)
    sched.sigmas = sched.sigmas.double()
    sigmas = sched.sigmas.clone()
    assert float(sigmas[-1]) == 0 and len(sigmas) == 11
    x = _start(tree_a64, sigmas[0])
    eps = _eps_model(tree_a64, lambda t: sigmas[sched.step_index or 0])  # the scheduler's sigma at this step
    x_vp = x / (1 + sigmas[0] ** 2).sqrt()
    for t in sched.timesteps[:-1]:
        x_vp = sched.step(eps(x_vp, int(t)), t, x_vp).prev_sample
    s_last = sigmas[-2]
    ref = tree_a64(x_vp * (1 + s_last**2).sqrt(), s_last.expand(B))
    if variant == "bh2":  # its own last step agrees
        t = sched.timesteps[-1]
        assert torch.allclose(sched.step(eps(x_vp, int(t)), t, x_vp).prev_sample, ref, atol=1e-12)
    ours = samplers.unipc(tree_a64, x.clone(), sigmas, order=order, variant=variant)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6), (ours - ref).abs().max()
    if order > 1:  # the corrector and the order matter
        assert (ours - samplers.unipc(tree_a64, x.clone(), sigmas, order=order - 1, variant=variant)).abs().max() > 1e-4


def test_discrete_grid_matches_diffusers():
    """vp_grid is diffusers' linear-beta alpha_bar (computed in float64); discrete() picks its timesteps."""
    sched = DDIMScheduler(num_train_timesteps=T)
    grid = schedules.vp_grid(T)
    abar = torch.cumprod(1 - sched.betas.double(), 0)  # diffusers' float32 betas, multiplied in float64
    assert torch.allclose(grid, _sigma(abar), rtol=1e-5)
    for spacing in ["leading", "trailing", "linspace"]:
        s = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        s.set_timesteps(25)
        sig = schedules.discrete(25, grid, spacing)
        assert torch.equal(schedules.timesteps(sig, grid), s.timesteps.long()), spacing
