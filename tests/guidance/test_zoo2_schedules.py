"""Guidance-weight schedules: documented values at given sigmas / steps, the step gate equal to the
guidance-interval paper's official gating on a Heun trajectory, the interval kind equal to guidance.interval,
the --weight syntax, and misuse refused."""

import math

import pytest
import torch

from guidelab import guidance as G
from guidelab import samplers, schedules, toy
from guidelab.errors import GuidelabError

W = toy.conditional_tree(leak=0.3, dtype=torch.float64)
SIG = schedules.karras(32, 0.002, 80.0, rho=7.0, dtype=torch.float64)  # the EDM Heun grid of the paper
X0 = W.world(2).sample(64, 80.0, generator=torch.Generator().manual_seed(0))
COND = {"label": torch.zeros(64, dtype=torch.long)}


def test_ramps_evaluate_to_the_documented_weights():
    sig = torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    lin = G.weight_schedule("linear", 1.0, 4.0, over="sigma", sigma_max=5.0, sigma_min=1.0)
    torch.testing.assert_close(lin.at(sig, None), torch.tensor([1.0, 2.5, 3.25, 4.0], dtype=torch.float64))
    cos = G.weight_schedule("cosine", 4.0, 1.0, over="sigma", sigma_max=5.0, sigma_min=1.0)
    p = torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64)
    torch.testing.assert_close(cos.at(sig, None), 4.0 - 3.0 * (1 - torch.cos(math.pi * p)) / 2)
    assert torch.equal(G.weight_schedule("constant", 2.5).at(sig, None), torch.full((4,), 2.5, dtype=torch.float64))
    box = G.weight_schedule("interval", 2.0, sigma_lo=1.0, sigma_hi=3.0)
    assert box.at(sig, None).tolist() == [1.0, 2.0, 2.0, 1.0]  # (sigma_lo, sigma_hi]
    run = G.Run(torch.zeros(4, 2), torch.linspace(1, 0, 11))  # 10 steps
    t = G.weight_schedule("linear", 1.0, 4.0)  # over normalised time
    for i in run.steps():
        assert t.at(sig, run).tolist() == pytest.approx([1.0 + 3.0 * i / 9] * 4)


def _official_heun(w, start, stop):
    """kynkaat/guidance-interval's EDM sampler, re-written: step i guided (both Heun evaluations) iff
    start <= i <= stop, the conditional model alone otherwise."""
    x = X0.clone()
    for i in range(len(SIG) - 1):
        s, s_next = SIG[i], SIG[i + 1]
        D = G.cfg(W, w) if start <= i <= stop else W
        d = (x - D(x, s.expand(64), **COND)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - D(x_next, s_next.expand(64), **COND)) / s_next
            x_next = x + (s_next - s) * (d + d2) / 2
        x = x_next
    return x


def test_step_gate_equals_the_official_gating_on_a_heun_trajectory():
    gated = G.cfg(W, G.weight_schedule("steps", 2.0, start=17, stop=22))  # EDM2-XXL FID preset
    torch.testing.assert_close(samplers.heun(gated, X0, SIG, cond=COND), _official_heun(2.0, 17, 22), rtol=0, atol=1e-12)
    sig_gate = samplers.heun(G.interval(G.cfg(W, 2.0), float(SIG[23]), float(SIG[17])), X0, SIG, cond=COND)
    assert not torch.allclose(sig_gate, _official_heun(2.0, 17, 22), atol=1e-12)  # a sigma gate differs at a boundary


def test_interval_kind_equals_the_interval_guider():
    sched = G.cfg(W, G.weight_schedule("interval", 2.0, sigma_lo=0.28, sigma_hi=1.61))
    torch.testing.assert_close(
        samplers.heun(sched, X0, SIG, cond=COND),
        samplers.heun(G.interval(G.cfg(W, 2.0), 0.28, 1.61), X0, SIG, cond=COND),
        rtol=0,
        atol=1e-12,
    )


def test_schedules_work_with_the_rules():
    g = G.apg(G.cfg(W, G.parse_weight("linear:1-4")), eta=0.0)
    assert torch.isfinite(samplers.heun(g, X0, SIG[::4].contiguous(), cond=COND)).all()
    torch.testing.assert_close(
        samplers.heun(G.cfg(W, G.weight_schedule("constant", 3.0)), X0, SIG, cond=COND),
        samplers.heun(G.cfg(W, 3.0), X0, SIG, cond=COND),
        rtol=0,
        atol=1e-12,
    )


def test_weight_syntax_and_misuse():
    assert G.parse_weight("2.5") == 2.5
    s = G.parse_weight("steps:2-1:start=17,stop=22")
    assert (s.kind, s.w_start, s.w_end, s.options) == ("steps", 2.0, 1.0, {"start": 17, "stop": 22})
    assert G.parse_weight("cosine:4-1:over=sigma").options == {"over": "sigma"}
    for bad in ("linear", "linear:a-b", "wave:1-2", "steps:2-1:start=3"):
        with pytest.raises(GuidelabError):
            G.parse_weight(bad)
    with pytest.raises(GuidelabError):
        G.weight_schedule("constant", 1.0, 2.0)
    with pytest.raises(GuidelabError):
        G.weight_schedule("linear", 1.0, 2.0, start=3)
    with pytest.raises(GuidelabError):  # the step gate needs a run
        G.cfg(W, G.weight_schedule("steps", 2.0, start=0, stop=3))(X0, SIG[:1].expand(64), **COND)


def test_compose_takes_a_schedule():
    sched = G.weight_schedule("interval", 3.0, sigma_lo=0.28, sigma_hi=1.61)
    both = G.compose(G.cfg(W, sched), G.icg(W, 1.0, seeds=range(64)))
    torch.testing.assert_close(
        samplers.heun(both, X0, SIG, cond=COND), samplers.heun(G.cfg(W, sched), X0, SIG, cond=COND), rtol=0, atol=1e-12
    )


def test_schedules_at_one_everywhere_are_unguided_bit_for_bit():
    ws = G.weight_schedule
    plain = samplers.heun(W, X0, SIG[::4].contiguous(), cond=COND)
    for sched in (
        ws("constant", 1.0),
        ws("linear", 1.0, 1.0),
        ws("cosine", 1.0, 1.0, over="sigma"),
        ws("interval", 1.0, sigma_lo=0.28, sigma_hi=1.61),
        ws("steps", 1.0, start=0, stop=3),
    ):
        rules = (G.tcfg, G.rescale, lambda g: G.cfg_zero_star(g, zero_steps=0))
        for g in (G.cfg(W, sched), *(r(G.cfg(W, sched)) for r in rules), G.perp_neg(G.cfg(W, sched), {"label": 1})):
            assert torch.equal(samplers.heun(g, X0, SIG[::4].contiguous(), cond=COND), plain), (sched, g.name)
