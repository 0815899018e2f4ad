"""Guidance zoo II rules (tcfg, fdg, cfg_norm, mag, dynamic_thresholding, perp_neg, cads): neutral settings,
each rule's defining property checked against a hand computation, and effects on the exact tree world."""

import functools

import pytest
import torch

from guidelab import guidance as G
from guidelab import samplers, schedules, toy
from guidelab.errors import GuidelabError
from guidelab.guidance._spaces import to_space
from guidelab.guidance.fdg import collapse, pyramid
from guidelab.guidance.tcfg import damp_tangent

W = toy.conditional_tree(leak=0.3, dtype=torch.float64)
N = 256
SIG = schedules.karras(32, 0.002, 5.0, dtype=torch.float64)
X0 = W.world(2).sample(N, 5.0, generator=torch.Generator().manual_seed(0))
COND = {"label": torch.zeros(N, dtype=torch.long)}
A, B = toy.tree("A", dtype=torch.float64), toy.tree("B", dtype=torch.float64)
x, s = X0[:16] * 0.3, torch.full((16,), 0.7, dtype=torch.float64)
lab = {"label": torch.zeros(16, dtype=torch.long)}

RULES = {
    "tcfg": G.tcfg,
    "cfg_norm": G.cfg_norm,
    "mag": G.mag,
    "dynamic_thresholding": G.dynamic_thresholding,
    "perp_neg": lambda g: G.perp_neg(g, {"label": 1}),
    "cads": lambda g: G.cads(g, key="emb"),
}


class Images:
    """An exact-world-backed image denoiser [B, 1, 2, 8]: the tree's 2-D denoiser on each pixel pair,
    the label as a float embedding (cads) or int; enough structure for bands and channels."""

    condition = G.Condition("label", {"label": 2}, 2)

    def __call__(self, x, sigma, label=None, emb=None):
        y = x.permute(0, 3, 1, 2).reshape(-1, 2)  # pixel pairs [B*8, 2]
        lab_ = (label if label is not None else torch.zeros(x.shape[0], dtype=torch.long)).repeat_interleave(8)
        out = W(y, sigma.repeat_interleave(8), lab_).reshape(x.shape[0], 8, 1, 2).permute(0, 2, 3, 1)
        return out if emb is None else out + 0.1 * emb[:, None, None, :1]


def test_neutral_settings_are_bit_identical():
    unguided = W(x, s, **lab)
    for name, rule in RULES.items():
        if name == "cads":
            continue
        assert torch.equal(rule(G.cfg(W, 1.0))(x, s, **lab), unguided), name
    cfg4 = G.cfg(W, 4.0)
    assert G.perp_neg(cfg4, {"label": 1}, neg_w=0) is cfg4
    torch.testing.assert_close(G.mag(cfg4, alpha=0)(x, s, **lab), cfg4(x, s, **lab), rtol=0, atol=1e-14)
    run = G.Run(x, SIG)
    emb = {"emb": torch.randn(16, 4, dtype=torch.float64)}

    def WE(x_, sigma, label, emb):
        return W(x_, sigma, label) + 0.1 * emb[:, :2]

    off = G.cads(WE, key="emb", tau1=1.0, tau2=2.0).start(run)
    assert torch.equal(off(x, s, **emb, **lab), WE(x, s, emb=emb["emb"], **lab))


def test_rules_are_unguided_bit_for_bit_where_a_schedule_or_per_sample_weight_is_one():
    """Where a schedule (here the step gate, outside its steps) or a per-sample weight is exactly 1, every
    rule returns the main branch bit for bit, as at the number w = 1 (no space round trip, no clipping)."""
    D_img = Images()
    xi, si = torch.randn(16, 1, 2, 8, dtype=torch.float64), torch.full((16,), 0.7, dtype=torch.float64)
    cases = {name: (rule, W, x, s) for name, rule in RULES.items() if name != "cads"}
    cases["fdg"] = (lambda g: G.fdg(g, 2.0), D_img, xi, si)
    w_ps = torch.tensor([1.0, 4.0] * 8, dtype=torch.float64)
    one = w_ps == 1
    for name, (rule, D, x_, s_) in cases.items():
        unguided = D(x_, s_, **lab)
        gated = rule(G.cfg(D, G.weight_schedule("steps", 4.0, start=1, stop=1)))
        run = G.Run(x_, SIG)
        g = gated.start(run)
        for i in run.steps():
            got = g(x_, s_, **lab)
            if i == 1:
                assert not torch.allclose(got, unguided), name
            else:
                assert torch.equal(got, unguided), (name, i)
            if i == 2:
                break
        got = rule(G.cfg(D, w_ps))(x_, s_, **lab)
        assert torch.equal(got[one], unguided[one]), name
        full = rule(G.cfg(D, 4.0))(x_, s_, **lab)
        torch.testing.assert_close(got[~one], full[~one], rtol=0, atol=1e-12)


def test_tcfg_drops_exactly_the_second_singular_direction():
    D_c, D_u = W(x, s, **lab), W(x, s, label=2)
    e_c, e_u = to_space(D_c, x, s, "eps"), to_space(D_u, x, s, "eps")
    u = damp_tangent(e_c, e_u)
    X = torch.stack([e_c, e_u], 1)  # [B, 2, 2]
    v1 = torch.linalg.eigh(X.transpose(1, 2) @ X).eigenvectors[..., -1]  # top eigenvector of X^T X
    torch.testing.assert_close(u, (e_u * v1).sum(1, keepdim=True) * v1, rtol=1e-10, atol=1e-12)
    assert ((e_u - u) * v1).sum(1).abs().max() < 1e-10  # what is removed is orthogonal to v1
    torch.testing.assert_close(damp_tangent(e_c, 0.5 * e_c), 0.5 * e_c)  # parallel branches: nothing removed
    got = G.tcfg(G.cfg(W, 3.0))(x, s, **lab)
    torch.testing.assert_close(to_space(got, x, s, "eps"), u + 3.0 * (e_c - u))


def test_fdg_bands_sum_back_and_equal_weights_are_cfg():
    img = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    for levels in (2, 3):
        torch.testing.assert_close(collapse(pyramid(img, levels)), img, rtol=0, atol=1e-13)
    D = Images()
    xi, si = torch.randn(4, 1, 2, 8, dtype=torch.float64), torch.full((4,), 0.7, dtype=torch.float64)
    li = {"label": torch.zeros(4, dtype=torch.long)}
    cfg = G.cfg(D, 3.0)
    torch.testing.assert_close(G.fdg(cfg, 3.0)(xi, si, **li), cfg(xi, si, **li), rtol=0, atol=1e-12)
    # w_low = 1: the conditional's low-pass band with CFG's high band, collapsed (by hand, with F.avg_pool2d)
    c, u = D(xi, si, **li), D(xi, si, label=torch.full((4,), 2))
    low_c, low_u = (torch.nn.functional.avg_pool2d(t, 2) for t in (c, u))
    up = lambda t: torch.nn.functional.interpolate(t, size=(2, 8), mode="bilinear", align_corners=False)  # noqa: E731
    high = (u - up(low_u)) + 3.0 * ((c - up(low_c)) - (u - up(low_u)))
    torch.testing.assert_close(G.fdg(cfg, 1.0)(xi, si, **li), up(low_c) + high, rtol=0, atol=1e-12)
    with pytest.raises(GuidelabError):
        G.fdg(G.cfg(D, 1.0), 2.0)  # w = 1 would silently skip w_low


def test_cfg_norm_caps_the_norm_at_the_conditional():
    D = Images()
    xi, si = torch.randn(4, 1, 2, 8, dtype=torch.float64) * 2, torch.full((4,), 1.5, dtype=torch.float64)
    li = {"label": torch.zeros(4, dtype=torch.long)}
    c, cfg = D(xi, si, **li), G.cfg(D, 6.0)(xi, si, **li)
    got = G.cfg_norm(G.cfg(D, 6.0))(xi, si, **li)
    n_c, n_cfg, n = c.norm(dim=1), cfg.norm(dim=1), got.norm(dim=1)
    assert (n <= n_c + 1e-12).all()
    keep = n_cfg <= n_c
    torch.testing.assert_close(n[~keep], n_c[~keep])  # shrunk exactly to the conditional's norm
    torch.testing.assert_close(got.movedim(1, -1)[keep], cfg.movedim(1, -1)[keep])  # untouched where smaller


def test_mag_weight_is_damped_by_the_magnitude_ratio():
    D_c, D_u = W(x, s, **lab), W(x, s, label=2)
    y_c, y_u = to_space(D_c, x, s, "flow"), to_space(D_u, x, s, "flow")
    r = (y_c - y_u).norm(dim=1) / y_u.norm(dim=1)
    w_eff = 1 + 4.0 * torch.exp(-8.0 * r)
    got = to_space(G.mag(G.cfg(W, 5.0))(x, s, **lab), x, s, "flow")
    torch.testing.assert_close(got, y_u + w_eff[:, None] * (y_c - y_u))


def test_dynamic_thresholding_bounds_and_leaves_small_outputs():
    cfg = G.cfg(W, 8.0)
    big = G.dynamic_thresholding(cfg, percentile=1.0, max_value=0.5)(x, s, **lab)
    assert big.abs().max() <= 0.5 + 1e-12
    ref = cfg(x, s, **lab)
    s_ = ref.abs().max(1).values.clamp_min(0.5)
    torch.testing.assert_close(big, ref * (0.5 / s_)[:, None])  # p = 1: a rescale by max(|x0|, c) / c
    torch.testing.assert_close(G.dynamic_thresholding(cfg, max_value=100.0)(x, s, **lab), ref)


def test_perp_neg_adds_only_a_direction_orthogonal_to_the_positive_one():
    calls = []

    def counted(x_, sigma, label):
        calls.append(x_.shape[0])
        return W(x_, sigma, label)

    counted.condition = W.condition
    got = G.perp_neg(G.cfg(counted, 3.0), {"label": 1}, neg_w=2.0)(x, s, **lab)
    assert calls == [48]  # three branches, one batched call
    D_c, D_u, D_n = W(x, s, **lab), W(x, s, label=2), W(x, s, label=1)
    e_pos, e_neg = D_c - D_u, D_n - D_u
    extra = got - G.cfg(W, 3.0)(x, s, **lab)
    assert (extra * e_pos).sum(1).abs().max() < 1e-10
    perp = e_neg - ((e_neg * e_pos).sum(1) / (e_pos * e_pos).sum(1))[:, None] * e_pos
    torch.testing.assert_close(extra, -3.0 * 2.0 * perp)


def test_cads_anneals_the_condition_on_the_paper_schedule():
    assert [G.cads.__globals__["gamma"](t, 0.6, 0.9) for t in (0.5, 0.6, 0.75, 0.9, 1.0)] == [1, 1, pytest.approx(0.5), 0, 0]
    seen = []

    def spy(x_, sigma, emb):
        seen.append(emb.clone())
        return x_ * 0

    y = torch.ones(16, 4, dtype=torch.float64)
    run = G.Run(x, torch.linspace(1, 0, 11, dtype=torch.float64), seeds=range(16))
    g = G.cads(spy, key="emb", psi=None, noise_scale=0.5).start(run)
    for _ in run.steps():
        g(x, s, emb=y)
    t = [1 - i / 10 for i in range(10)]
    for ti, e in zip(t, seen):
        gam = G.cads.__globals__["gamma"](ti, 0.6, 0.9)
        if gam == 1:
            assert torch.equal(e, y)
        elif gam == 0:
            assert abs(float(e.std()) - 0.5) < 0.2 and e.mean().abs() < 0.25  # pure noise, s n
    first = seen[0]
    again = G.cads(spy, key="emb", psi=None, noise_scale=0.5).start(G.Run(x, run.sigmas, seeds=range(16)))
    seen.clear()
    again(x, s, emb=y)
    assert torch.equal(seen[0], first)  # per-sample seeded
    with pytest.raises(GuidelabError):
        G.cads(spy, key="emb")(x, s, emb=y)  # outside a run
    with pytest.raises(GuidelabError):
        G.cads(W).start(run)(x, s, **lab)  # integer labels


@functools.lru_cache(None)
def stats(name):
    gs = {
        "cfg8": lambda: G.cfg(W, 8.0),
        "norm8": lambda: G.cfg_norm(G.cfg(W, 8.0), per="sample"),
        "dt8": lambda: G.dynamic_thresholding(G.cfg(W, 8.0), max_value=1.0),
        "mag8": lambda: G.mag(G.cfg(W, 8.0), alpha=1.0),
        "tcfg8": lambda: G.tcfg(G.cfg(W, 8.0)),
        "unguided": lambda: W,
    }
    out = samplers.heun(gs[name](), X0, SIG, cond=COND)
    ref = A.sample(N, 0.0, generator=torch.Generator().manual_seed(1))
    centre = ref.mean(0)
    return {
        "fracA": (A.logp(out) > B.logp(out)).double().mean().item(),
        "overshoot": (out - centre).norm(dim=1).mean().item() - (ref - centre).norm(dim=1).mean().item(),
    }


@pytest.mark.parametrize("name", ["norm8", "dt8", "mag8", "tcfg8"])
def test_rules_temper_high_weight_cfg_on_the_exact_world(name):
    """At w = 8 CFG overshoots the class; each rule keeps the class gain and overshoots less."""
    u, c, r = stats("unguided"), stats("cfg8"), stats(name)
    print(name, u, c, r)
    assert r["fracA"] > u["fracA"] + 0.1
    assert r["overshoot"] < c["overshoot"]


def test_perp_neg_ignores_a_negative_on_the_positive_line():
    """Perp-Neg's point: a negative overlapping the positive direction does not undo it. On the tree the
    null is the A/B mixture, so D_B - D_null is (anti)parallel to D_A - D_null: Perp-Neg is CFG there."""
    x0, cond = X0[:64], {"label": COND["label"][:64]}
    c = samplers.heun(G.cfg(W, 3.0), x0, SIG, cond=cond)
    p = samplers.heun(G.perp_neg(G.cfg(W, 3.0), {"label": 1}, neg_w=1.0), x0, SIG, cond=cond)
    torch.testing.assert_close(p, c, rtol=0, atol=1e-9)
    assert not torch.allclose(c, samplers.heun(W, x0, SIG, cond=cond))  # and it guides
