"""DPS: diffusion posterior sampling (Chung et al., ICLR 2023, arXiv 2209.14687, Alg. 1).

An ancestral (DDPM) step from ``x_i``, then a step down the gradient of the measurement residual of
the denoised estimate, taken *through the denoiser* (their Alg. 1, lines 4-7)::

    x0_hat = D(x_i)
    x'     = DDPM step of x_i (eta = 1)
    x_{i-1} = x' - zeta_i grad_{x_i} |y - A(x0_hat)|^2,   zeta_i = zeta' / |y - A(x0_hat)|

i.e. ``x' - 2 zeta' grad |y - A(x0_hat)|``. The official code (DPS2022/diffusion-posterior-sampling,
``PosteriorSampling``) takes ``scale * grad_{x_t} |y - A(x0_hat)|`` (so ``scale = 2 zeta'``) in VP units;
``zeta`` here is that ``scale``. In EDM units (``x_VP = x / sqrt(1 + sigma^2)``) the VP update is
``x_{i-1} = x' - zeta sqrt((1 + sigma_i^2)(1 + sigma_{i-1}^2)) grad_x |y - A(D(x))|``. ``A`` may be any
differentiable operator (also non-linear): an :class:`~guidelab.inverse.Operator` or a callable.

Official defaults: 1000 DDPM steps, measurement noise 0.05, ``scale`` 0.5 (random inpainting), 0.3
(4x super-resolution), 1.0 the code default. Differences: the norm is per sample (the code takes it
over the whole batch and runs batch 1); the DDPM variance is the posterior one (the code uses the
model's learned range). TFG's ``preset="dps"`` is the analogue in its design space
(:func:`guidelab.guidance.tfg.tfg_sample`).

NFE: 1 per step, plus one backward pass through the denoiser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

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
from ._common import check_number, through_denoiser, vp
from .operators import Operator


def residual_norm(A: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x0 -> |y - A(x0)|`` per sample [B] (``A`` an operator or a callable ``A(x0) -> [B, ...]``)."""

    def norm(x0: torch.Tensor) -> torch.Tensor:
        r = (y - A(x0)).reshape(x0.shape[0], -1)
        return torch.linalg.vector_norm(r, dim=1)

    return norm


@overload
def _measurement(operator: Operator, y: torch.Tensor, x: torch.Tensor) -> tuple[Operator, torch.Tensor]: ...
@overload
def _measurement(
    operator: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, x: torch.Tensor
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]: ...
def _measurement(
    operator: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, x: torch.Tensor
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """``(A, y)`` checked against ``x``: an operator's own checks, or a callable and a finite ``y`` in x's dtype."""
    if isinstance(operator, Operator):
        op = operator
        op._as_sample(x)
        return op, op.measurement(y, x.shape[0], x)
    check(callable(operator), f"operator must be a guidelab.inverse operator or a callable A(x0), got {type(operator).__name__}")
    y = torch.as_tensor(y).to(x)
    check(bool(torch.isfinite(y).all()), "the observation y contains NaN or inf values")
    return operator, y


@torch.no_grad()
def dps(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    operator: Operator | Callable[[torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    *,
    zeta: float = 1.0,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    noise: Noise = None,
) -> torch.Tensor:
    """Posterior sampling for ``y = A(x0) + noise`` (DPS), from ``x`` at ``sigmas[0]``; ``zeta`` = the code's ``scale``."""
    sigmas = check_inputs(x, sigmas)
    A, y = _measurement(operator, y, x)
    check_number(zeta, "zeta")
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "dps", frozenset())
    noise = resolve_noise(noise, x, sigmas)
    sig, batch, cond = sigmas.tolist(), x.shape[0], cond or {}
    norm = residual_norm(A, y)
    for i in run.steps(progress, "dps"):
        sigma, sigma_next = sig[i], sig[i + 1]
        s = torch.full((batch,), sigma, dtype=x.dtype, device=x.device)
        D, g = through_denoiser(denoiser, x, s, cond, norm)  # grad_{x_i} |y - A(x0_hat)|
        report(callback, x, i, sigmas, sigma, D)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        x_next = euler_step(None, x, D, sigma, sigma_down)
        if sigma_next > 0:
            x_next = x_next + sigma_up * noise(sigma, sigma_next)
        x = x_next - (zeta * vp(sigma) * vp(sigma_next)) * g  # Alg. 1, line 7 (VP units)
    return x
