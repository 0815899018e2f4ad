"""The ``steps`` weight schedule against the guidance-interval paper's official EDM sampler
(kynkaat/guidance-interval ``edm_sampler``, re-written here by hand): step ``i`` uses the guided
denoiser, for both Heun evaluations, iff ``guidance_start <= i <= guidance_stop``; with stochastic churn
(the noise level raised to t_hat before the step) too. Also: what the gate counts is steps, not sigmas."""

import math

import pytest
import torch

from guidelab import guidance as G
from guidelab import samplers, schedules, toy

W = toy.conditional_tree(leak=0.3, dtype=torch.float64)
N = 32
SIG = schedules.karras(N, 0.002, 80.0, rho=7.0, dtype=torch.float64)  # the paper's EDM2 grid
B = 32
X0 = W.world(2).sample(B, 80.0, generator=torch.Generator().manual_seed(3))
COND = {"label": torch.zeros(B, dtype=torch.long)}
_g = torch.Generator().manual_seed(4)
NOISE = [torch.randn(B, 2, generator=_g, dtype=torch.float64) for _ in range(N)]


def _official(G_w, start, stop, S_churn=0.0, S_min=0.0, S_max=math.inf, S_noise=1.0):
    """edm_sampler with guidance_interval=[start, stop]; uncond = the null label, cond = label 0."""
    t_steps = SIG
    x_next = X0.clone()
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * NOISE[i]
        if start <= i <= stop:

            def denoise(x, t):
                return W(x, t.expand(B), label=torch.full((B,), 2)).lerp(W(x, t.expand(B), **COND), G_w)
        else:

            def denoise(x, t):
                return W(x, t.expand(B), **COND)

        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < N - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def _noise():
    step = {float(s): n for s, n in zip(SIG[:-1].tolist(), NOISE)}
    return lambda sigma, sigma_next: step[float(sigma)]


@pytest.mark.parametrize(
    "w,start,stop,churn",
    [(2.0, 17, 22, 0.0), (2.0, 17, 22, 40.0), (3.0, 0, 5, 0.0), (1.5, 10, 12, 10.0)],
)
def test_steps_schedule_equals_the_official_edm_sampler(w, start, stop, churn):
    g = G.cfg(W, G.weight_schedule("steps", w, start=start, stop=stop))
    kw = dict(s_churn=churn, s_tmin=0.05, s_tmax=50.0, noise=_noise()) if churn else {}
    got = samplers.heun(g, X0, SIG, cond=COND, **kw)
    ref = _official(w, start, stop, *((churn, 0.05, 50.0) if churn else ()))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    assert not torch.allclose(got, _official(w, start + 1, stop, *((churn, 0.05, 50.0) if churn else ())), atol=1e-8)


def test_under_churn_the_gate_follows_the_step_not_the_raised_sigma():
    """With churn the step's evaluations are at t_hat > t_i; a sigma gate set at step 17's sigma would
    see a sigma above it and skip the step, the step gate does not (as the official code)."""
    hi = float(SIG[17])
    kw = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, noise=_noise())
    stepped = samplers.heun(G.cfg(W, G.weight_schedule("steps", 2.0, start=17, stop=22)), X0, SIG, cond=COND, **kw)
    by_sigma = samplers.heun(G.interval(G.cfg(W, 2.0), float(SIG[23]), hi), X0, SIG, cond=COND, **kw)
    ref = _official(2.0, 17, 22, 40.0, 0.05, 50.0)
    torch.testing.assert_close(stepped, ref, rtol=0, atol=1e-10)
    assert (by_sigma - ref).abs().max() > 1e-6
