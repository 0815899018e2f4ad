"""Per-run state: the sampler creates one Run per run and advances it once per step. APG's momentum lives in it,
CFG-Zero*'s zero-init reads its step index, ICG / TSG draw from its per-sample seeds."""

import pytest
import torch

from guidelab import guidance as G
from guidelab import samplers, schedules, toy
from guidelab.errors import GuidelabError
from guidelab.guidance import tfg_sample
from guidelab.rng import SampleNoise
from guidelab.samplers import BrownianNoise

SIG = schedules.karras(8, 0.05, 5.0, dtype=torch.float64)
A_VEC, C_VEC = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)


def _constant(x, sigma, label):
    """D_c = a (label 1), D_u = a - c (label 0 = null): dD = c, perpendicular to D_c, at every call."""
    return A_VEC - (label == 0).to(x.dtype)[:, None] * C_VEC


CONSTANT = G.Condition("label", {"label": 0}, 2)


class Constant:
    condition = CONSTANT

    def __call__(self, x, sigma, label):
        return _constant(x, sigma, label)


def _denoised(sampler, g, **kw):
    x = torch.zeros(4, 2, dtype=torch.float64) + 3.0
    seen = []
    sampler(
        g,
        x,
        SIG,
        cond={"label": torch.ones(4, dtype=torch.long)},
        noise=SampleNoise(range(4)),
        callback=lambda d: seen.append(d["denoised"][0].clone()),
        **kw,
    )
    return seen


@pytest.mark.parametrize(
    "sampler, kw",
    [
        (samplers.euler, {}),
        (samplers.heun, {"s_churn": 40.0}),
        (samplers.dpm_2_ancestral, {"eta": 1.0}),
        (samplers.heun, {}),
        (samplers.dpmpp_2s_ancestral, {}),
    ],
)
def test_apg_momentum_advances_once_per_step_and_never_resets_mid_run(sampler, kw):
    """m_i = c (1 - beta^(i+1)) / (1 - beta) at step i. Old code: heun + churn reset the momentum at every step
    (sigma rose between calls), dpm_2_ancestral at eta = 1 from float rounding; Heun counted two updates a step."""
    w, beta = 3.0, -0.5
    seen = _denoised(sampler, G.apg(G.cfg(Constant(), w), eta=0.0, beta=beta), **kw)
    assert len(seen) == len(SIG) - 1
    for i, D in enumerate(seen):
        m = C_VEC * (1 - beta ** (i + 1)) / (1 - beta)
        torch.testing.assert_close(D, A_VEC + (w - 1) * m, rtol=1e-12, atol=1e-12)


def test_apg_momentum_is_fresh_for_every_run_and_refused_outside_one():
    g = G.apg(G.cfg(Constant(), 3.0), eta=0.0, beta=-0.5)
    first, again = _denoised(samplers.heun, g), _denoised(samplers.heun, g)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    x, s = torch.zeros(4, 2, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    with pytest.raises(GuidelabError, match="apg with momentum"):
        g(x, s, label=torch.ones(4, dtype=torch.long))
    G.apg(G.cfg(Constant(), 3.0), eta=0.0)(x, s, label=torch.ones(4, dtype=torch.long))  # beta = 0: stateless


def test_run_steps_set_the_step_index_and_state_is_per_owner():
    run = G.Run(torch.zeros(3, 1), [2.0, 1.0, 0.0], seeds=[5, 6, 7])
    assert [(i, run.step) for i in run.steps()] == [(0, 0), (1, 1)]
    a, b = object(), object()
    assert run.state(a, list) is run.state(a, list) and run.state(a, list) is not run.state(b, list)
    with pytest.raises(GuidelabError, match="batch 3"):
        G.Run(torch.zeros(3, 1), [1.0, 0.0], seeds=[1, 2])


def test_cfg_zero_star_zero_initialises_the_first_step_by_default():
    """Default zero_steps = 1 (paper, diffusers): v = 0 at step 0, i.e. D = x / (1 + sigma), for both Heun
    evaluations of that step; step 1 is guided. Outside a run the step-gated form is refused."""
    W = toy.conditional_tree(leak=0.3, dtype=torch.float64)
    x = W.world(2).sample(8, 5.0, generator=torch.Generator().manual_seed(0))
    cond = {"label": torch.zeros(8, dtype=torch.long)}
    for sampler in (samplers.euler, samplers.heun):
        xs, Ds = [], []
        sampler(
            G.cfg_zero_star(G.cfg(W, 4.0)), x, SIG, cond=cond, callback=lambda d: (xs.append(d["x"]), Ds.append(d["denoised"]))
        )
        s0, s1 = float(SIG[0]), float(SIG[1])
        torch.testing.assert_close(Ds[0], x / (1 + s0))
        torch.testing.assert_close(xs[1] / (1 + s1), x / (1 + s0))  # the rescaled sample did not move
        assert (Ds[1] - xs[1] / (1 + s1)).abs().max() > 1e-3
    with pytest.raises(GuidelabError, match="zero-initialises the first 1 steps"):
        G.cfg_zero_star(G.cfg(W, 4.0))(x, SIG[:1].expand(8), **cond)
    G.cfg_zero_star(G.cfg(W, 4.0), zero_steps=0)(x, SIG[:1].expand(8), **cond)
    with pytest.raises(GuidelabError, match="not both"):
        G.cfg_zero_star(G.cfg(W, 4.0), zero_steps=1, zero_init_sigma=1.0)


class LabelSpy:
    """Records the reference branch's label (ICG) or noise-embedding offset (TSG): rows B..2B of each call."""

    condition = G.Condition("label", {"label": 10}, 10)

    def __init__(self):
        self.refs = []

    def __call__(self, x, sigma, label=None, noise_embed_offset=None):
        B = x.shape[0] // 2
        self.refs.append((label[B:] if noise_embed_offset is None else noise_embed_offset[B:]).clone())
        return x / (1 + sigma[:, None] ** 2)


def _draws(make, seeds, batch=6):
    spy = LabelSpy()
    x = torch.ones(batch, 2, dtype=torch.float64)
    noise = None if seeds is None else SampleNoise(seeds)
    samplers.euler(make(spy), x, SIG, cond={"label": torch.zeros(batch, dtype=torch.long)}, noise=noise)
    return torch.stack(spy.refs)


@pytest.mark.parametrize("make", [lambda d: G.icg(d, 2.0), lambda d: G.tsg(d, 2.0, dim=3)], ids=["icg", "tsg"])
def test_icg_and_tsg_draw_from_the_run_seeds(make):
    """Old code keyed the draws on the batch's sigmas: every same-size batch got the same y_hat / offsets."""
    one, two, three = _draws(make, range(6)), _draws(make, range(6, 12)), _draws(make, range(6))
    assert not torch.equal(one, two) and torch.equal(one, three)
    # per sample: a sub-batch with the same seeds draws the same (batch-size invariant)
    part = _draws(make, range(2, 4), batch=2)
    assert torch.equal(part, one[:, 2:4])
    # no seeds anywhere: fresh draws from torch's global generator, different for two same-size batches
    assert not torch.equal(_draws(make, None), _draws(make, None))


def test_run_seeds_equal_explicit_seeds():
    seeds = list(range(20, 26))
    via_run = _draws(lambda d: G.icg(d, 2.0), seeds)
    explicit = _draws(lambda d: G.icg(d, 2.0, seeds=seeds), None)
    assert torch.equal(via_run, explicit)


def test_tfg_refuses_brownian_noise():
    """Old code: one Brownian path gave the same draw for all 11 uses of a step (smoothing, DDIM, renoise)."""
    world = toy.tree("A", dtype=torch.float64)
    x = world.sample(4, 5.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(GuidelabError, match="BrownianNoise|Brownian path"):
        tfg_sample(world, x, SIG, lambda y: -y.square().sum(1), noise=BrownianNoise(range(4)))


def test_tfg_clips_images_to_the_data_range_by_default():
    """Official default clip_x0=True, range 1: image batches [B, C, H, W] clipped to [-1, 1]; points are not."""

    def loud(x, sigma):
        return 3.0 * x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)

    def run(x, **kw):
        return tfg_sample(
            loud, x, SIG, lambda y: -y.flatten(1).square().sum(1), preset="dps", rho=0.0, noise=SampleNoise(range(4)), **kw
        )

    img = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
    assert torch.equal(run(img), run(img, clip_x0=1.0)) and not torch.equal(run(img), run(img, clip_x0=None))
    pts = img.flatten(1)
    assert torch.equal(run(pts), run(pts, clip_x0=None))
