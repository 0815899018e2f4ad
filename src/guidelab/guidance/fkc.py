"""Feynman-Kac correctors, FKC; the method's documentation is :func:`fkc_sample`'s docstring."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import check
from ..rng import SampleNoise
from ..samplers.base import Callback, ancestral_step, begin_run, check_inputs, euler_step, report, resolve_noise
from ._base import Guided


def systematic_resample(log_w: torch.Tensor, u: float) -> torch.Tensor:
    """Indices [K] of systematic resampling (Kitagawa 1996) of particles with log-weights ``log_w`` [K].

    ``u`` in [0, 1) is the single uniform: positions ``(u + i) / K``. Particle j is copied between
    ``floor(K W_j)`` and ``ceil(K W_j)`` times (``W`` the normalised weights).
    """
    K = log_w.shape[0]
    W = torch.softmax(log_w.double(), 0)
    cdf = W.cumsum(0)
    cdf[-1] = 1.0
    positions = (u + torch.arange(K, dtype=torch.float64, device=log_w.device)) / K
    return torch.searchsorted(cdf, positions, right=True).clamp_max(K - 1)


def ess(log_w: torch.Tensor) -> float:
    """Effective sample size ``(sum W)^2 / sum W^2`` of log-weights [K]."""
    W = torch.softmax(log_w.double(), 0)
    return float(1 / (W**2).sum())


def _reweight(
    x: torch.Tensor,
    D: torch.Tensor,
    c: torch.Tensor,
    log_w: torch.Tensor,
    d_a: torch.Tensor,
    K: int,
    clamp: float | None,
    ess_threshold: float,
    uniform: Callable[[int, int], float],
    i: int,
    final: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add the increments ``d_a`` [B] to ``log_w`` (in place) and resample each group of K that needs it."""
    B = x.shape[0]
    if clamp is not None:
        d_a = d_a.view(-1, K)
        d_a = (d_a - d_a.mean(1, keepdim=True)).clamp(-clamp, clamp).view(-1)
    log_w += d_a
    index = torch.arange(B, device=x.device)
    for gi in range(B // K):
        lw = log_w[gi * K : (gi + 1) * K]
        if final or ess(lw) < ess_threshold * K:
            index[gi * K : (gi + 1) * K] = gi * K + systematic_resample(lw, uniform(gi, i))
            log_w[gi * K : (gi + 1) * K] = 0
    return x[index], D[index], c[index]


def fkc_sample(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    beta: float | None = None,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    noise: object = None,
    particles: int | None = None,
    ess_threshold: float = 1.0,
    clamp: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``p_c^w p_u^(1-w)`` (``denoiser`` a linear guider) or ``p^beta`` (a plain denoiser and ``beta``).

    * ``denoiser = cfg(...)`` / ``autoguidance(...)`` / ``icg(...)`` with a scalar weight ``w``: the
      target is ``p_main^w p_ref^(1 - w)``; both branches are evaluated in one batched call.
    * any denoiser with ``beta``: the target is ``p^beta``. Start ``x`` near ``p_sigma_max^beta``
      (for large sigma_max about ``N(mean, (sigma_max^2 + var) / beta)``).

    ``particles``: resampling group size (divides the batch; default the batch). A group is resampled
    when its ESS < ``ess_threshold * particles`` (1.0: every step, as the paper) and always after the
    last step, so the output is unweighted. ``clamp``: clip the centred log-weight increments to
    ``[-clamp, clamp]`` (the official EDM2 code uses 1 or 2; biased, None is exact). ``generator``
    feeds the resampling uniforms when ``noise`` is not a ``SampleNoise``.

    Feynman-Kac correctors, FKC (Skreta et al. 2025, arXiv 2503.02819; methods.md §12).

    CFG's score ``(1 - w) s_u + w s_c`` is the score of ``q_t = p_c,t^w p_u,t^(1-w)`` at every noise
    level, yet the reverse SDE driven by it does *not* sample ``q_0``: the product of two heat-diffused
    densities is not the heat-diffused product. Itô/Feynman-Kac give the missing factor (derived for
    the EDM heat process ``dp/dt = (d sigma^2/dt) Laplace(p) / 2``)::

        d log weight = w (w - 1) sigma |d sigma| |s_c - s_u|^2        (reverse time, |d sigma| > 0)

    (official code ``edm2/generate_images.py::edm_sampler_new``: ``d_a = -w (w - 1) |s_u - s_c|^2 dt sigma``,
    ``dt < 0``). A batch of weighted particles, resampled (systematic resampling), samples ``q_0`` exactly
    in the limit of many particles and small steps. The same machinery anneals: ``p^beta`` has score
    ``beta s`` and weight increment ``beta (beta - 1) sigma |d sigma| |s|^2`` (the product rule with a flat
    reference, ``D_ref = x``). Weight convention: ``w`` is guidelab's (= the paper's beta for CFG).

    Sampler: the reverse SDE in its exact-for-Gaussians DDPM discretisation (the ancestral step with
    eta = 1, :func:`guidelab.samplers.base.ancestral_step`) rather than the official Euler-Maruyama,
    whose step ``x + 2 (sigma - sigma_next) / sigma (D - x)`` overshoots for coarse steps; the last step
    returns ``D``. The weight rate is integrated over each step by the trapezoid rule, its end value being
    the next step's start value (no extra NFE), so particles are reweighted and resampled at the start of
    the next step, and after the last. Cost: the guider's NFE per step (CFG: 2 branches in one batched
    call), plus resampling.

    Determinism: resampling copies particles, so a sample is *not* a function of its own seed alone.
    Particles are resampled within groups of ``particles`` consecutive samples (default: the whole
    batch). With ``noise=SampleNoise(seeds)`` slot ``i`` always draws from ``seeds[i]`` (whichever
    particle occupies it) and a group's resampling uniforms come from its own seeds, so a group's
    output depends only on its seeds: whole groups are batch-size invariant, single samples are not.
    """
    if isinstance(denoiser, Guided):
        check(beta is None, "fkc_sample takes either a guider (its w is the exponent) or a denoiser with beta, not both")
        check(denoiser.rule is None, f"fkc_sample needs a linear guider (cfg, autoguidance, icg, tsg), got {denoiser.name}")
        check(not isinstance(denoiser.w, torch.Tensor), "fkc_sample needs a scalar guidance weight w")
        w = float(denoiser.w)
    else:
        check(beta is not None, "fkc_sample needs a linear guider (cfg, autoguidance, ...) or a denoiser with beta=...")
        assert beta is not None
        w = float(beta)
    check(math.isfinite(w), f"the exponent must be finite, got {w}")
    check(clamp is None or clamp > 0, f"clamp must be None or > 0, got {clamp}")
    check(0 <= ess_threshold <= 1, f"ess_threshold must lie in [0, 1], got {ess_threshold}")
    sigmas = check_inputs(x, sigmas)
    B = x.shape[0]
    K = B if particles is None else particles
    check(isinstance(K, int) and K >= 1 and B % K == 0, f"particles must be an integer dividing the batch {B}, got {particles!r}")
    guided = isinstance(denoiser, Guided)
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "fkc_sample", supports=frozenset())
    draw = resolve_noise(noise, x, sigmas)
    seeds = noise.seeds if isinstance(noise, SampleNoise) else None
    cond = cond or {}
    sig = sigmas.tolist()
    log_w = torch.zeros(B, dtype=torch.float64, device=x.device)

    def uniform(group: int, i: int) -> float:
        if seeds is not None:  # from the group's own seeds only (see below)
            key = hash((tuple(seeds[group * K : (group + 1) * K]), i, 0x464B43)) & 0x7FFF_FFFF_FFFF_FFFF
            g = torch.Generator().manual_seed(key)
            return float(torch.rand((), generator=g, dtype=torch.float64))
        return float(torch.rand((), generator=generator, dtype=torch.float64))

    c_prev = None
    for i in run.steps(progress, "fkc"):
        sigma, sigma_next = sig[i], sig[i + 1]
        s_vec = torch.full((B,), sigma, dtype=x.dtype, device=x.device)
        run.evaluations += 1
        if guided:
            assert isinstance(denoiser, Guided)  # the bound guider (Guided.start returns a Guided)
            D_main, D_ref = denoiser.branches(x, s_vec, cond)
            D = D_ref.lerp(D_main, w)  # score (1 - w) s_ref + w s_main
        else:
            D_main, D_ref = denoiser(x, s_vec, **cond), x  # flat reference: s_ref = 0
            D = x.lerp(D_main, w)  # score beta s
        report(callback, x, i, sigmas, sigma, D)
        # FKC weight rate per unit |d sigma|: c = w (w - 1) sigma |s_main - s_ref|^2 with
        # s_main - s_ref = (D_main - D_ref) / sigma^2; trapezoid rule over each step (end value = next start value).
        c = w * (w - 1) / sigma**3 * (D_main - D_ref).double().flatten(1).square().sum(1)
        if c_prev is not None and w != 1:
            d_a = 0.5 * (c_prev + c) * (sig[i - 1] - sigma)
            x, D, c = _reweight(x, D, c, log_w, d_a, K, clamp, ess_threshold, uniform, i, False)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, 1.0)
        x = euler_step(None, x, D, sigma, sigma_down)
        if sigma_next > 0 and sigma_up > 0:
            x = x + draw(sigma, sigma_next) * sigma_up
        c_prev = c
    if w != 1:  # last interval [0, sigma_{N-1}]: c = 0 at sigma = 0
        assert c_prev is not None
        x, _, _ = _reweight(x, x, c_prev, log_w, 0.5 * c_prev * sig[-2], K, clamp, ess_threshold, uniform, len(sig), True)
    return x
