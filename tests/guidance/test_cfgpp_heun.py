"""CFG++ under Heun (guidelab's derivation, samplers.base.heun_step): CFG Heun at the step's CFG++ weight
w = lam s / (s - s'), started from x + (D_lam - D_u). Checked against the derivation written out, against
unconditional Heun at lam = 0, CFG++ Euler (first stage, last step), CFG Heun (second order) and on the
exact world."""

import math

import pytest
import torch

from guidelab import guidance as G
from guidelab import samplers, schedules, toy
from guidelab.rng import SampleNoise

LAM = 0.4
SIG = schedules.karras(8, 0.01, 5.0)
W = toy.conditional_tree(dtype=torch.float64)
X = W.world(2).sample(16, 5.0, generator=torch.Generator().manual_seed(0))
LABEL = torch.arange(16) % 2
COND = {"label": LABEL}


def _branches(x, s, lam=LAM):
    S = torch.full((x.shape[0],), s, dtype=x.dtype)
    D_c, D_u = W(x, S, label=LABEL), W(x, S, label=torch.full_like(LABEL, 2))
    return D_u + lam * (D_c - D_u), D_u


def _noise(sigma, sigma_next):
    g = torch.Generator().manual_seed(int(sigma * 1e6))
    return torch.randn(16, 2, generator=g, dtype=torch.float64)


def ref_heun(x, s_churn=0.0):
    """CFG Heun at w = lam s / (s - s') over each step (EDM Alg. 2 with churn), written out."""
    sig = SIG.tolist()
    n = len(sig) - 1
    for s, s_next in zip(sig[:-1], sig[1:]):
        gamma = min(s_churn / n, math.sqrt(2) - 1)
        if gamma > 0:
            s_hat = s * (1 + gamma)
            x = x + math.sqrt(s_hat**2 - s**2) * _noise(s, s_next)
            s = s_hat
        D_lam, D_u = _branches(x, s)
        if s_next == 0:
            x = D_lam  # CFG++ Euler to 0
            continue
        k = s / (s - s_next)  # w / lam
        D_w = D_u + k * (D_lam - D_u)
        d = (x - D_w) / s
        x_e = x + (s_next - s) * d
        D2_lam, D2_u = _branches(x_e, s_next)
        d2 = (x_e - (D2_u + k * (D2_lam - D2_u))) / s_next
        x = x + (s_next - s) * (d + d2) / 2
    return x


class Uncond:
    """The unconditional branch alone (the null label), as a plain denoiser."""

    def __call__(self, x, sigma, label):
        return W(x, sigma, label=torch.full_like(label, 2))


class Recorder:
    """W, recording the inputs of every call (the guider calls it once per evaluation, both branches batched)."""

    condition = W.condition

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, label):
        self.calls.append((x.clone(), sigma.clone()))
        return W(x, sigma, label=label)


@pytest.mark.parametrize("s_churn", [0.0, 40.0])
def test_heun_cfgpp_matches_the_derivation(s_churn):
    out = samplers.heun(G.cfgpp(W, LAM), X, SIG, cond=COND, s_churn=s_churn, noise=_noise)
    torch.testing.assert_close(out, ref_heun(X, s_churn), rtol=1e-9, atol=1e-9)
    # and it is neither CFG-Heun at w = lam nor CFG++ Euler
    assert (out - samplers.heun(G.cfg(W, LAM), X, SIG, cond=COND, s_churn=s_churn, noise=_noise)).abs().max() > 1e-3
    assert (out - samplers.euler(G.cfgpp(W, LAM), X, SIG, cond=COND, s_churn=s_churn, noise=_noise)).abs().max() > 1e-3


@pytest.mark.parametrize("s_churn", [0.0, 40.0])
def test_lam_0_is_unconditional_heun_bit_for_bit(s_churn):
    out = samplers.heun(G.cfgpp(W, 0.0), X, SIG, cond=COND, s_churn=s_churn, noise=SampleNoise(range(16)))
    assert torch.equal(out, samplers.heun(Uncond(), X, SIG, cond=COND, s_churn=s_churn, noise=SampleNoise(range(16))))


def test_the_first_stage_is_the_cfgpp_euler_step():
    rec = Recorder()
    samplers.heun(G.cfgpp(rec, LAM), X, SIG, cond=COND)
    x_e, s_e = rec.calls[1]  # step 0's second evaluation (rows: conditional, then null)
    seen = {}
    samplers.euler(G.cfgpp(W, LAM), X, SIG, cond=COND, callback=lambda d: seen.setdefault(d["i"], d["x"]))
    assert float(s_e[0]) == float(SIG[1]) and torch.equal(x_e[:16], seen[1]) and torch.equal(x_e[16:], seen[1])


def test_the_last_step_is_cfgpp_eulers():
    seen = {}
    out = samplers.heun(G.cfgpp(W, LAM), X, SIG, cond=COND, callback=lambda d: seen.__setitem__(d["i"], d["x"]))
    last = len(SIG) - 2
    tail = samplers.euler(G.cfgpp(W, LAM), seen[last], SIG[last:], cond=COND)
    assert torch.equal(out, tail)


def test_batch_invariant_per_sample():
    kw = {"s_churn": 40.0}
    full = samplers.heun(G.cfgpp(W, LAM), X, SIG, cond=COND, noise=SampleNoise(range(16)), **kw)
    rows = [3, 7, 11]
    part = samplers.heun(G.cfgpp(W, LAM), X[rows], SIG, cond={"label": LABEL[rows]}, noise=SampleNoise(rows), **kw)
    assert torch.equal(full[rows], part)


def _at_sigma_min(den, N, name="heun"):
    """The state at sigma_min (before the step to 0) on the log-uniform grid of N steps."""
    seen = {}
    sig = schedules.exponential(N, 0.002, 5.0)
    samplers.get(name)(den, X, sig, cond=COND, callback=lambda d: seen.__setitem__("x", d["x"]))
    return seen["x"]


def _lam(N, c):
    """The lam whose CFG++ weight is w = c on every step of the log-uniform grid: lam = c (1 - s'/s)."""
    return -c * math.expm1(-math.log(5.0 / 0.002) / (N - 1))


def test_second_order_is_cfg_heun_at_the_cfgpp_weight():
    """With lam = c (1 - s'/s) on a log-uniform grid, CFG++ Euler is CFG Euler at w = c (methods.md §4) and
    CFG++ Heun is CFG Heun at w = c (up to the step to 0), hence second order in the step."""
    for N in (8, 16):
        torch.testing.assert_close(
            _at_sigma_min(G.cfgpp(W, _lam(N, 1.4)), N), _at_sigma_min(G.cfg(W, 1.4), N), rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(
            _at_sigma_min(G.cfgpp(W, _lam(N, 1.4)), N, "euler"),
            _at_sigma_min(G.cfg(W, 1.4), N, "euler"),
            rtol=1e-12,
            atol=1e-12,
        )


@pytest.mark.slow
def test_second_order_beats_euler_at_equal_nfe():
    """Error at sigma_min vs CFG Heun at w = 1.4 with 512 steps (RMS over the 16 samples). Measured: CFG++ Heun
    N = 16, 32, 64: 0.024, 0.0057, 0.0013 (second order); CFG++ Euler at 2N (equal NFE): 0.050, 0.032, 0.022
    (first order). With 256 samples and N = 8 Euler at 2N wins (0.107 vs 0.150); from N = 16 Heun does."""
    ref = _at_sigma_min(G.cfg(W, 1.4), 512)

    def err(N, name="heun"):
        return float((_at_sigma_min(G.cfgpp(W, _lam(N, 1.4)), N, name) - ref).square().sum(1).mean().sqrt())

    heun = [err(N) for N in (16, 32, 64)]
    euler = [err(2 * N, "euler") for N in (16, 32, 64)]
    print("\nCFG++ heun", heun, "CFG++ euler 2N", euler)
    assert heun[1] / heun[2] > 3 and euler[1] / euler[2] < 2.5
    assert all(h < e for h, e in zip(heun, euler))


def test_heun_cfgpp_guides_on_the_exact_world():
    """Leaky world (label 0 = 0.7 A + 0.3 B), 16 steps: CFG++ Heun at lam = 0.6 raises the class-A fraction
    over unguided Heun, as CFG++ Euler does; CFG Heun at w = 0.6 (what a silent fallback would run) lowers it."""
    Wl, A, B = toy.conditional_tree(leak=0.3), toy.tree("A"), toy.tree("B")
    n = 256
    x = Wl.world(2).sample(n, 5.0, generator=torch.Generator().manual_seed(0))
    sig = schedules.karras(16, 0.002, 5.0)
    cond = {"label": torch.zeros(n, dtype=torch.long)}

    def frac_a(den, name="heun"):
        out = samplers.get(name)(den, x, sig, cond=cond)
        return float((A.logp(out) > B.logp(out)).float().mean())

    base, pp, weak, euler = frac_a(Wl), frac_a(G.cfgpp(Wl, 0.6)), frac_a(G.cfg(Wl, 0.6)), frac_a(G.cfgpp(Wl, 0.6), "euler")
    print(f"\nfraction in A: unguided {base:.3f}, CFG++ heun {pp:.3f}, CFG heun w 0.6 {weak:.3f}, CFG++ euler {euler:.3f}")
    assert pp > base + 0.05 and weak < base - 0.04 and abs(pp - euler) < 0.05
