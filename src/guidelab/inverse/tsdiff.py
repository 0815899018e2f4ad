"""TSDiff (Kollovieh et al., NeurIPS 2023, arXiv 2307.11494): an *unconditional* time-series denoiser
used for forecasting and imputation by observation self-guidance, and the "refine" step.

Self-guidance (their Sec. 4.1): the observed values ``y_obs`` (mask ``m``) define an energy on the
denoised estimate, and each DDPM step is shifted down its gradient (the official ``DDPMGuidance``:
``x_{t-1} <- x_{t-1} - s beta~_t grad E``, beta~_t the DDPM posterior variance)::

    E(x)  = sum_obs (D(x) - y_obs)^2                             guidance="mse"   (Gaussian)
    E(x)  = sum_obs rho_q(y_obs - D(x)),  rho_q(e) = max(q e, (q - 1) e)   guidance="quantile" (asym. Laplace)

In EDM units (``x_VP = x / sqrt(1 + sigma^2)``, ``beta~ = sigma_up^2 / (1 + sigma_next^2)``) the shift is
``- s sigma_up^2 sqrt((1 + sigma^2) / (1 + sigma_next^2)) grad_x E``. The quantile level ``q`` is per
sample; the official code gives the k-th of S samples of a series ``q = k / (S + 1)``
(:func:`quantile_levels`). Official defaults: 100 DDPM steps, linear betas 1e-4..0.1, ``scale`` 4 (config
default; per data set 0.5..8), 100 samples.

Refine (their Sec. 4.2, the official ``MCMCRefiner`` / ``MostLikelyRefiner``): starting from a base
forecast, descend (``method="most_likely"``) or Langevin-sample (``method="lmc"``) the energy

    E(y) = |y - D(y + sigma eps, sigma)|^2 / sigma^2  +  s sum_obs loss(y, y_obs)

(the denoising loss ``|eps_hat - eps|^2`` at one fixed noise level, fresh ``eps`` every iteration, as
a proxy for ``-log p(y)``), ``y <- y - eta grad E + sqrt(2 eta) gamma xi``. Defaults as the official
configs: 20 iterations, ``eta = 0.1``, ``gamma = 0.1`` (lmc), fixed ``t = 20`` of the 100-step
schedule (:func:`tsdiff_sigma`).

Differences from the official code: guidance evaluates the energy at the sample *before* the step
(the code evaluates the denoiser at the new sample with the old t); the quantile refiner there also
regularises the forecast window towards the base forecast (here both losses use the observed
positions only); "most_likely" is plain gradient descent (the code uses SGD with a plateau schedule).

NFE: guidance 1 per step (+ one backward); refine 1 per iteration (+ one backward).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..errors import check
from ..samplers.base import (
    Callback,
    ancestral_step,
    begin_run,
    check_inputs,
    euler_step,
    report,
    resolve_noise,
)
from ..samplers.edm import Noise
from ._common import check_int, check_number, grad, through_denoiser, vp

_LOSSES = ("mse", "quantile")


def tsdiff_sigma(t: int = 20, timesteps: int = 100, beta_start: float = 1e-4, beta_end: float = 0.1) -> float:
    """The EDM sigma of step ``t`` of TSDiff's linear VP schedule: ``sqrt((1 - abar_t) / abar_t)``."""
    check_int(t, "t", 0)
    check(t < timesteps, f"t must be < timesteps ({timesteps}), got {t}")
    abar = float(np.prod(1 - np.linspace(beta_start, beta_end, timesteps)[: t + 1]))
    return math.sqrt((1 - abar) / abar)


def tsdiff_sigmas(timesteps: int = 100, beta_start: float = 1e-4, beta_end: float = 0.1) -> torch.Tensor:
    """The sigmas of TSDiff's 100-step schedule, decreasing, with the final 0 (for the samplers)."""
    abar = np.cumprod(1 - np.linspace(beta_start, beta_end, timesteps))
    s = np.sqrt((1 - abar) / abar)[::-1].copy()
    return torch.tensor(np.append(s, 0.0), dtype=torch.float32)


def quantile_levels(n: int) -> torch.Tensor:
    """``q_k = k / (n + 1)``, k = 1..n: the official code's quantile per sample of a series."""
    check_int(n, "n", 1)
    return torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)


def _observed(y: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, mask)`` broadcast to ``x``'s shape: y zero where unobserved, the mask as 0 / 1 in x's dtype."""
    mask = torch.as_tensor(mask, device=x.device)
    if mask.dtype != torch.bool:
        check(bool(((mask == 0) | (mask == 1)).all()), "mask must be boolean or contain only 0 and 1 (1 = observed)")
        mask = mask == 1
    check(
        mask.shape in (x.shape, x.shape[1:]),
        f"mask must be shaped like one sample {list(x.shape[1:])} or like x, got {list(mask.shape)}",
    )
    y = torch.as_tensor(y).to(x)
    check(
        y.shape in (x.shape, x.shape[1:]), f"y must be shaped like one sample {list(x.shape[1:])} or like x, got {list(y.shape)}"
    )
    check(
        bool(torch.isfinite(torch.where(mask.expand_as(x), y.expand_as(x), 0.0)).all()),
        "the observed values y contain NaN or inf",
    )
    return torch.where(mask.expand_as(x), y.expand_as(x), 0.0), mask.expand_as(x).to(x.dtype)


def _loss(kind: str, q: float | torch.Tensor | None, x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-value guidance loss ``(pred, y) -> [B, ...]``: squared error or the pinball loss at ``q``."""
    check(kind in _LOSSES, f"unknown TSDiff guidance {kind!r}; allowed: {list(_LOSSES)}")
    if kind == "mse":
        return lambda pred, y: (pred - y).square()
    check(q is not None, "quantile guidance needs the quantile level q (a number in (0, 1) or [batch] levels)")
    q = torch.as_tensor(q, dtype=x.dtype, device=x.device)
    q = q.expand(x.shape[0]) if q.ndim == 0 else q
    check(q.shape == (x.shape[0],) and bool(((q > 0) & (q < 1)).all()), "q must be in (0, 1), a number or [batch] levels")
    qb = q.reshape(-1, *([1] * (x.ndim - 1)))

    def quantile(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        e = y - pred
        return torch.maximum(qb * e, (qb - 1) * e)  # pinball loss rho_q

    return quantile


@torch.no_grad()
def tsdiff_guided(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: float = 4.0,
    guidance: str = "quantile",
    q: float | torch.Tensor | None = None,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    noise: Noise = None,
) -> torch.Tensor:
    """TSDiff observation self-guidance: DDPM sampling of ``x`` (noise at ``sigmas[0]``, series [B, L] or
    [B, C, L]) guided toward ``y`` at the positions ``mask`` (True = observed)."""
    sigmas = check_inputs(x, sigmas)
    y, m = _observed(y, mask, x)
    check_number(scale, "scale")
    loss = _loss(guidance, q, x)
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "tsdiff", frozenset())
    noise = resolve_noise(noise, x, sigmas)
    sig, batch, cond = sigmas.tolist(), x.shape[0], cond or {}
    for i in run.steps(progress, "tsdiff"):
        sigma, sigma_next = sig[i], sig[i + 1]
        s = torch.full((batch,), sigma, dtype=x.dtype, device=x.device)
        D, g = through_denoiser(denoiser, x, s, cond, lambda D_: (m * loss(D_, y)).flatten(1).sum(1))
        report(callback, x, i, sigmas, sigma, D)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        x_next = euler_step(None, x, D, sigma, sigma_down)
        if sigma_next > 0:
            x_next = x_next + sigma_up * noise(sigma, sigma_next)
        x = x_next - (scale * sigma_up**2 * vp(sigma) / vp(sigma_next)) * g  # - s beta~ grad E, VP units
    return x


@torch.no_grad()
def tsdiff_refine(
    denoiser: Callable[..., torch.Tensor],
    init: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    *,
    sigma: float | None = None,
    iterations: int = 20,
    step_size: float = 0.1,
    noise_scale: float = 0.1,
    method: str = "lmc",
    guidance: str = "mse",
    scale: float = 1.0,
    q: float | torch.Tensor | None = None,
    cond: dict | None = None,
    noise: Noise = None,
) -> torch.Tensor:
    """TSDiff refine: improve a base forecast ``init`` (the whole window, [B, L] or [B, C, L]) under the
    denoiser's implicit density and the observations ``y`` at ``mask``. ``sigma``: the fixed noise level
    of the denoising energy (default :func:`tsdiff_sigma`, t = 20). ``noise``: ``SampleNoise`` for seeds."""
    check(isinstance(init, torch.Tensor) and init.ndim >= 2, "init must be a tensor [batch, ...] (the base forecast)")
    check(bool(torch.isfinite(init).all()), "init contains NaN or inf values")
    check(method in ("lmc", "most_likely"), f"unknown refine method {method!r}; allowed: 'lmc', 'most_likely'")
    check_int(iterations, "iterations", 0)
    check_number(step_size, "step_size", positive=True)
    check_number(noise_scale, "noise_scale")
    check_number(scale, "scale")
    sigma = tsdiff_sigma() if sigma is None else sigma
    check_number(sigma, "sigma", positive=True)
    yo, m = _observed(y, mask, init)
    loss = _loss(guidance, q, init)
    x = init.clone()
    draw = resolve_noise(noise, x)
    batch, cond = x.shape[0], cond or {}
    s = torch.full((batch,), sigma, dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        eps = draw(sigma, 0.0)

        def E(yg: torch.Tensor, eps: torch.Tensor = eps) -> torch.Tensor:
            denoising = (yg - denoiser(yg + sigma * eps, s, **cond)).flatten(1).square().sum(1) / sigma**2
            return denoising + scale * (m * loss(yg, yo)).flatten(1).sum(1)

        _, g = grad(E, x)
        x = x - step_size * g
        if method == "lmc":
            x = x + math.sqrt(2 * step_size) * noise_scale * draw(sigma, 0.0)
    return x
