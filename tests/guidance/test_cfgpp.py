"""CFG++ through the samplers: one renoise mechanism, checked against the paper's update rules."""

import math

import pytest
import torch

from guidelab import guidance as G, samplers, schedules, toy
from guidelab.samplers.base import ancestral_step

LAM = 0.4
SIG = schedules.karras(8, 0.01, 5.0)


def _setup():
    W = toy.conditional_tree(dtype=torch.float64)
    x = W.world(2).sample(16, 5.0, generator=torch.Generator().manual_seed(0))
    label = torch.arange(16) % 2
    return W, x, label


def _branches(W, x, s, label):
    S = torch.full((x.shape[0],), s, dtype=x.dtype)
    D_c, D_u = W(x, S, label=label), W(x, S, label=torch.full_like(label, 2))
    return D_u + LAM * (D_c - D_u), D_u


def _noise(sigma, sigma_next):
    g = torch.Generator().manual_seed(int(sigma * 1e6))
    return torch.randn(16, 2, generator=g, dtype=torch.float64)


def ref_euler_ancestral(W, x, label, eta):
    sig = SIG.tolist()
    for s, s_next in zip(sig[:-1], sig[1:]):
        D_lam, D_u = _branches(W, x, s, label)
        s_down, s_up = ancestral_step(s, s_next, eta)
        x = D_lam + s_down * (x - D_u) / s                              # CFG++ Euler(-ancestral)
        if s_next > 0 and s_up > 0:
            x = x + s_up * _noise(s, s_next)
    return x


def ref_ddim(W, x, label):
    """Paper's DDIM in VP coordinates: z' = sqrt(a') x0(eps_lam) + sqrt(1 - a') eps_u."""
    sig = SIG.tolist()
    for s, s_next in zip(sig[:-1], sig[1:]):
        D_lam, D_u = _branches(W, x, s, label)
        a_next = 1 / (1 + s_next ** 2)
        eps_u = (x - D_u) / s
        z_next = math.sqrt(a_next) * D_lam + math.sqrt(1 - a_next) * eps_u
        x = z_next / math.sqrt(a_next)
    return x


def ref_dpmpp_2m(W, x, label):
    """CFGpp-diffusion's DPM++ 2M CFG++ (k-diffusion form, t = -log sigma)."""
    sig = SIG.tolist()
    old = None
    for i, (s, s_next) in enumerate(zip(sig[:-1], sig[1:])):
        D_lam, D_u = _branches(W, x, s, label)
        if old is None or s_next == 0:
            x = D_lam + s_next * (x - D_u) / s
        else:
            h = math.log(s) - math.log(s_next)
            r = (math.log(sig[i - 1]) - math.log(s)) / h
            x = D_lam - math.exp(-h) * D_u - math.expm1(-h) * (D_lam - old) / (2 * r) + math.exp(-h) * x
        old = D_u
    return x


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "ddim", "ddim_eta", "dpmpp_2m"])
def test_cfgpp_samplers_match_the_paper(name):
    W, x, label = _setup()
    g = G.cfgpp(W, LAM)
    cond = {"label": label}
    if name == "euler":
        out, ref = samplers.euler(g, x, SIG, cond=cond), ref_euler_ancestral(W, x, label, 0.0)
    elif name == "euler_ancestral":
        out, ref = samplers.euler_ancestral(g, x, SIG, cond=cond, noise=_noise), ref_euler_ancestral(W, x, label, 1.0)
    elif name == "ddim":
        out, ref = samplers.ddim(g, x, SIG, cond=cond), ref_ddim(W, x, label)
    elif name == "ddim_eta":
        out, ref = samplers.ddim(g, x, SIG, cond=cond, eta=0.5, noise=_noise), ref_euler_ancestral(W, x, label, 0.5)
    else:
        out, ref = samplers.dpmpp_2m(g, x, SIG, cond=cond), ref_dpmpp_2m(W, x, label)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    # and it differs from plain CFG at the same lambda (which renoises with D_lam)
    plain = G.cfg(W, LAM)
    other = {"euler": samplers.euler, "dpmpp_2m": samplers.dpmpp_2m}.get(name)
    if other is not None:
        assert (other(plain, x, SIG, cond=cond) - out).abs().max() > 1e-3


def test_plain_denoisers_are_untouched_and_interval_forwards_the_pair():
    W, x, label = _setup()
    cond = {"label": label}
    # interval(cfgpp): CFG++ inside, the conditional model (one evaluation) outside
    g = G.interval(G.cfgpp(W, LAM), 0.5, 10.0)
    out = samplers.euler(g, x, SIG, cond=cond)
    sig = SIG.tolist()
    y = x
    for s, s_next in zip(sig[:-1], sig[1:]):
        if s > 0.5:
            D, D_r = _branches(W, y, s, label)
        else:
            D = D_r = W(y, torch.full((16,), s, dtype=torch.float64), label=label)
        y = D + s_next * (y - D_r) / s
    torch.testing.assert_close(out, y, rtol=1e-9, atol=1e-9)
    # lam = 1 and lam = 0 are valid; outside [0, 1] is refused
    for lam in (0.0, 1.0):
        G.cfgpp(W, lam)
