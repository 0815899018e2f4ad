"""Unit proofs for the guidance zoo: w = 1 no-ops, costs, formulas, state, composition."""

import pytest
import torch

from guidelab import guidance as G
from guidelab import samplers, schedules, toy
from guidelab.denoisers import to_eps
from guidelab.errors import GuidelabError


class Net(torch.nn.Module):
    """A smooth label- and noise-embedding-conditional denoiser that records its calls."""

    condition = G.Condition("label", {"label": 2}, 2)

    def __init__(self, scale=1.0):
        super().__init__()
        self.calls, self.scale = [], scale

    def forward(self, x, sigma, label=None, noise_embed_offset=None):
        self.calls.append(x.shape[0])
        c = (sigma.log() / 4)[:, None]
        if noise_embed_offset is not None:
            c = c + noise_embed_offset.reshape(-1, 1)
        lab = torch.zeros_like(x[:, 0]) if label is None else label.to(x.dtype)
        shift = torch.stack([lab - 0.5, 0.7 * lab], 1)
        return self.scale * (x / (1 + sigma[:, None] ** 2) + 0.3 * shift * torch.tanh(c + 1) + 0.05 * c)


def _inputs(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, 2, generator=g, dtype=torch.float64),
        torch.rand(B, generator=g, dtype=torch.float64) + 0.1,
        torch.randint(0, 2, (B,), generator=g),
    )


def _guiders(net, guide, w):
    """Every guider that has a weight, built on ``net`` (label-conditional) at weight ``w``."""
    return {
        "cfg": G.cfg(net, w),
        "cfg_uncond_net": G.cfg(net, w, uncond=guide),
        "autoguidance": G.autoguidance(net, guide, w),
        "rescale": G.rescale(G.cfg(net, w), 0.7),
        "cfg_zero_star": G.cfg_zero_star(G.cfg(net, w), zero_init_sigma=4.0),
        "icg": G.icg(net, w),
        "icg_gaussian_on_tsg_key": G.tsg(net, w, s=0.5, form="scalar"),
        "apg": G.apg(G.cfg(net, w), eta=0.0, r=2.0, beta=-0.5),
        "interval_autoguidance": G.interval(G.autoguidance(net, guide, w), 0.3, 2.0),
        "apg_on_icg": G.apg(G.icg(net, w), eta=0.5),
        "epsilon_scaling_cfg": G.epsilon_scaling(G.cfg(net, w), 1.0),
    }


def test_w1_is_bit_identical_to_the_unguided_denoiser_through_a_sampler():
    net, guide = Net(), Net(0.9)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 5
    cond = {"label": torch.arange(16) % 2}
    sig = schedules.karras(32, 0.002, 5.0)
    plain = samplers.heun(net, x, sig, cond=cond)
    for name, g in _guiders(net, guide, 1.0).items():
        assert torch.equal(samplers.heun(g, x, sig, cond=cond), plain), name
    # and guidance does something at w != 1
    for name, g in _guiders(net, guide, 2.0).items():
        assert not torch.equal(samplers.heun(g, x, sig, cond=cond), plain), name


@pytest.mark.parametrize(
    "name, calls, rows",
    [
        ("cfg", 1, 16),
        ("cfg_uncond_net", 1, 8),
        ("autoguidance", 1, 8),
        ("rescale", 1, 16),
        ("cfg_zero_star", 1, 16),
        ("icg", 1, 16),
        ("icg_gaussian_on_tsg_key", 1, 16),
        ("apg", 1, 16),
        ("apg_on_icg", 1, 16),
        ("epsilon_scaling_cfg", 1, 16),
    ],
)
def test_cost_per_evaluation(name, calls, rows):
    """Same-network branches: one batched call of 2B rows; separate networks: one call each."""
    net, guide = Net(), Net(0.9)
    x, sigma, label = _inputs()
    _guiders(net, guide, 3.0)[name].start(G.Run(x, [1.0, 0.0]))(x, sigma, label=label)  # apg's momentum: in a run
    assert net.calls == [rows] * calls
    assert guide.calls == ([8] if name in ("cfg_uncond_net", "autoguidance") else [])


def test_interval_costs_one_evaluation_outside_and_splits_mixed_batches():
    net = Net()
    x, _, label = _inputs()
    g = G.interval(G.cfg(net, 3.0), 0.3, 2.0)
    inner = G.cfg(net, 3.0)
    for s, rows in ((1.0, [16]), (2.0, [16]), (0.3, [8]), (5.0, [8])):  # (lo, hi]: 2.0 in, 0.3 out
        net.calls.clear()
        sigma = torch.full((8,), s, dtype=torch.float64)
        out = g(x, sigma, label=label)
        assert net.calls == rows
        ref = inner(x, sigma, label=label) if rows == [16] else net(x, sigma, label=label)
        assert torch.equal(out, ref)
    sigma = torch.tensor([0.1, 1.0] * 4, dtype=torch.float64)  # mixed: split, per-sample gate
    net.calls.clear()
    out = g(x, sigma, label=label)
    assert sorted(net.calls) == [4, 8]
    inside = sigma > 0.3
    torch.testing.assert_close(out[inside], inner(x, sigma, label=label)[inside], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[~inside], net(x, sigma, label=label)[~inside], rtol=1e-12, atol=1e-12)


def test_rescale_formula_and_limits():
    net = Net()
    x, sigma, label = _inputs()
    D_c, D_u = net(x, sigma, label=label), net(x, sigma, label=torch.full_like(label, 2))
    torch.testing.assert_close(G.rescale(G.cfg(net, 5.0), 0.0)(x, sigma, label=label), D_u + 5 * (D_c - D_u))
    for space in ("v", "eps", "x0"):
        from guidelab.guidance._spaces import to_space

        out = G.rescale(G.cfg(net, 5.0), 1.0, space=space)(x, sigma, label=label)
        y, y_c = to_space(out, x, sigma, space), to_space(D_c, x, sigma, space)
        torch.testing.assert_close(y.std(1), y_c.std(1))  # phi = 1: std of the conditional (eq. 16)
    with pytest.raises(GuidelabError, match="space"):
        G.rescale(G.cfg(net, 2.0), space="logit")


def test_cfg_zero_star_cancels_a_pure_scale_error_and_zero_init_freezes_the_flow():
    """s* = <v_c, v_u>/|v_u|^2 undoes an unconditional velocity that is a scaled copy of the conditional one."""
    x, sigma, label = _inputs()
    D_c = Net()(x, sigma, label=label)
    v_c = to_eps(D_c, x, sigma) - D_c  # rectified-flow velocity eps - x0
    s = sigma[:, None]
    cond_net = lambda x, sigma, label: D_c
    uncond = lambda x, sigma: (x - s * (0.6 * v_c)) / (1 + s)  # v_u = 0.6 v_c
    out = G.cfg_zero_star(G.cfg(cond_net, 4.0, uncond=uncond), zero_steps=0)(x, sigma, label=label)
    torch.testing.assert_close(out, D_c, rtol=1e-10, atol=1e-10)
    cfg = G.cfg(cond_net, 4.0, uncond=uncond)(x, sigma, label=label)
    assert (cfg - D_c).abs().max() > 0.1  # plain CFG overshoots
    # zero-init: v = 0 for sigma >= zero_init_sigma, so one Euler step keeps x / (1 + sigma) fixed
    net = Net()
    g = G.cfg_zero_star(G.cfg(net, 3.0), zero_init_sigma=5.0)
    D = g(x, torch.full((8,), 5.0, dtype=torch.float64), label=label)
    torch.testing.assert_close(D, x / 6.0)
    x_next = x + (4.0 - 5.0) * (x - D) / 5.0  # Euler step 5 -> 4
    torch.testing.assert_close(x_next / 5.0, x / 6.0)


def test_apg_reduces_to_cfg_and_projects():
    net = Net()
    x, sigma, label = _inputs()
    D_c, D_u = net(x, sigma, label=label), net(x, sigma, label=torch.full_like(label, 2))
    torch.testing.assert_close(G.apg(G.cfg(net, 3.0), eta=1.0)(x, sigma, label=label), G.cfg(net, 3.0)(x, sigma, label=label))
    out = G.apg(G.cfg(net, 3.0), eta=0.0)(x, sigma, label=label)
    upd = (out - D_c) / 2.0  # (w - 1) dD_perp
    torch.testing.assert_close((upd * D_c).sum(1), torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(upd + ((D_c - D_u) * D_c).sum(1, keepdim=True) / (D_c * D_c).sum(1, keepdim=True) * D_c, D_c - D_u)
    r_out = G.apg(G.cfg(net, 3.0), eta=1.0, r=0.01)(x, sigma, label=label)  # norm threshold
    torch.testing.assert_close((r_out - D_c).norm(dim=1), torch.full((8,), 0.02, dtype=torch.float64))
    with pytest.raises(GuidelabError, match="linear guider"):
        G.apg(G.rescale(G.cfg(net, 3.0)))


def test_apg_momentum_is_per_run():
    """m = dD + beta m within a run; every sampler run starts from m = 0, so runs repeat exactly."""
    net = Net()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cond = {"label": torch.arange(8) % 2}
    sig = schedules.karras(6, 0.01, 5.0)
    g = G.apg(G.cfg(net, 3.0), eta=1.0, beta=-0.5)
    a, b = samplers.euler(g, x, sig, cond=cond), samplers.euler(g, x, sig, cond=cond)
    assert torch.equal(a, b)
    assert not torch.equal(a, samplers.euler(G.cfg(net, 3.0), x, sig, cond=cond))
    # the momentum by hand: at the 2nd evaluation the update is dD_2 - 0.5 dD_1
    run = G.Run(x, [2.0, 1.0, 0.0])
    g2 = G.apg(G.cfg(net, 3.0), eta=1.0, beta=-0.5).start(run)
    s1, s2 = torch.full((8,), 2.0, dtype=torch.float64), torch.full((8,), 1.0, dtype=torch.float64)
    dD = lambda s: net(x, s, **cond) - net(x, s, label=torch.full((8,), 2))
    steps = run.steps()
    next(steps)
    g2(x, s1, **cond)
    next(steps)
    torch.testing.assert_close(g2(x, s2, **cond), net(x, s2, **cond) + 2.0 * (dD(s2) - 0.5 * dD(s1)))


def test_icg_random_reference_labels():
    net = Net()
    x, sigma, label = _inputs(B=64)
    seen = []
    orig = net.forward

    def spy(x, sigma, label=None, **k):
        seen.append(label.clone())
        return orig(x, sigma, label=label, **k)

    net.forward = spy
    G.icg(net, 2.0)(x, sigma, label=label)
    ref = seen[0][64:]
    assert set(ref.tolist()) == {0, 1}  # uniform over the real classes, never null
    # per-sample seeds: a sample's reference label depends on its own seed only (batch-size invariant)
    seeds = list(range(100, 164))
    full = G.icg(net, 2.0, seeds=seeds)(x, sigma, label=label)
    half = G.icg(net, 2.0, seeds=seeds[:32])(x[:32], sigma[:32], label=label[:32])
    torch.testing.assert_close(full[:32], half, rtol=1e-12, atol=1e-12)
    # Gaussian embeddings: same per-sample mean/std as the real embedding
    emb = torch.randn(64, 16, dtype=torch.float64) * 3 + 1
    got = {}
    G.icg(
        lambda x, sigma, e: got.setdefault(len(got), e) @ torch.ones(16, 2, dtype=torch.float64) * 0 + x,
        2.0,
        key="e",
        kind="gaussian",
    )(x, sigma, e=emb)
    y_hat = got[0][64:]
    assert (y_hat.mean(1) - emb.mean(1)).abs().mean() < 1.0 and (y_hat.std(1) / emb.std(1)).mean().sub(1).abs() < 0.25
    with pytest.raises(GuidelabError, match="num_classes"):
        G.icg(lambda x, sigma, **c: x, 2.0)


def test_tsg_offset_reaches_only_the_reference_branch():
    net = Net()
    x, sigma, _ = _inputs()
    seen = []
    orig = net.forward

    def spy(x, sigma, label=None, noise_embed_offset=None):
        seen.append(noise_embed_offset.clone())
        return orig(x, sigma, label=label, noise_embed_offset=noise_embed_offset)

    net.forward = spy
    G.tsg(net, 2.0, s=0.5, alpha=1.0, form="scalar")(x, sigma)
    off = seen[0]
    assert torch.equal(off[:8], torch.zeros(8, dtype=torch.float64))
    t = sigma**2 / (1 + sigma**2)
    n = off[8:] / (0.5 * t)  # s t^alpha n
    assert n.abs().max() < 5 and n.std() > 0.3
    # black-box fallback: the reference branch is called at sigma * exp(4 offset), one batched call
    calls = []

    def blackbox(x, sigma):
        calls.append(sigma.clone())
        return x / (1 + sigma[:, None] ** 2)

    G.tsg(blackbox, 2.0, s=0.5, hook=False)(x, sigma)
    assert len(calls) == 1 and torch.equal(calls[0][:8], sigma) and not torch.equal(calls[0][8:], sigma)
    with pytest.raises(GuidelabError, match="dim"):
        G.tsg(blackbox, 2.0, hook=False, dim=4)


def test_epsilon_scaling_formula_and_intended_effect():
    """eps' = eps / lambda; a denoiser whose eps is too large by lambda is corrected exactly."""
    A = toy.tree("A", dtype=torch.float64)
    x = A.sample(64, 0.5, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((64,), 0.5, dtype=torch.float64)
    D = A(x, sigma)
    inflated = lambda x, sigma: x - 1.01 * (x - A(x, sigma))  # eps inflated by 1.01
    torch.testing.assert_close(G.epsilon_scaling(inflated, 1.01)(x, sigma), D)
    torch.testing.assert_close(G.epsilon_scaling(A, lambda s: 1 + 0.1 * s)(x, sigma), x - (x - D) / 1.05)
    assert torch.equal(G.epsilon_scaling(A, 1.0)(x, sigma), D)


def test_cfgpp_pair_and_euler_equivalence():
    """CFG++ Euler: x' = D_lam + sigma' (x - D_u) / sigma = one CFG step at w = lam sigma / (sigma - sigma')."""
    net = Net()
    x, _, label = _inputs()
    lam, s0, s1 = 0.3, 2.0, 1.5
    g = G.cfgpp(net, lam)
    D, D_r = g.pair(x, torch.full((8,), s0, dtype=torch.float64), label=label)
    S = torch.full((8,), s0, dtype=torch.float64)
    D_c, D_u = net(x, S, label=label), net(x, S, label=torch.full_like(label, 2))
    torch.testing.assert_close(D, D_u + lam * (D_c - D_u))
    assert torch.equal(D_r, D_u)
    net.calls.clear()
    g(x, S, label=label)
    assert net.calls == [16]
    w_eff = lam * s0 / (s0 - s1)
    expected = D + s1 * (x - D_u) / s0
    cfg_step = x + (s1 - s0) * (x - G.cfg(net, w_eff)(x, S, label=label)) / s0
    torch.testing.assert_close(expected, cfg_step)
    with pytest.raises(GuidelabError, match="lam"):
        G.cfgpp(net, 1.5)


def test_composition_without_special_cases():
    net, guide = Net(), Net(0.9)
    x, sigma, label = _inputs()
    sigma = torch.full((8,), 1.0, dtype=torch.float64)
    # autoguidance inside an interval == autoguidance inside, main model outside
    torch.testing.assert_close(
        G.interval(G.autoguidance(net, guide, 2.0), 0.5, 2.0)(x, sigma, label=label),
        G.autoguidance(net, guide, 2.0)(x, sigma, label=label),
    )
    # APG on ICG with eta = 1 is ICG
    torch.testing.assert_close(
        G.apg(G.icg(net, 2.0, seeds=range(8)), eta=1.0)(x, sigma, label=label),
        G.icg(net, 2.0, seeds=range(8))(x, sigma, label=label),
    )
    # interval around APG around CFG, epsilon scaling around all of it
    g = G.epsilon_scaling(G.interval(G.apg(G.cfg(net, 2.0), eta=0.0), 0.5, 2.0), 1.002)
    inner = G.apg(G.cfg(net, 2.0), eta=0.0)(x, sigma, label=label)
    torch.testing.assert_close(g(x, sigma, label=label), x - (x - inner) / 1.002)
    torch.testing.assert_close(g.unguided(x, sigma, label=label), x - (x - net(x, sigma, label=label)) / 1.002)
    with pytest.raises(GuidelabError, match="unguided"):
        G.interval(lambda x, sigma: x, 0.1, 1.0)
