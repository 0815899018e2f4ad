"""Meng et al.'s stochastic N-step sampler ("On Distillation of Guided Diffusion Models", Meng, Rombach,
Gao, Kingma, Ermon, Ho, Salimans 2023, arXiv 2210.03142, Sec. 4.3 "N-step deterministic and stochastic
sampling"): for the progressively distilled student of stage 2, each step is one deterministic DDIM step
of *twice* the step length followed by one stochastic step *back* (forward diffusion) by one step length.

On the grid ``sigmas`` (EDM coordinates, DDIM = Euler on the PF-ODE): from ``sigma_i`` a DDIM step to
``sigma_{i+2}``, then ``x += sqrt(sigma_{i+1}^2 - sigma_{i+2}^2) n`` (the forward process from sigma_{i+2}
to sigma_{i+1}); so every step ends at ``sigma_{i+1}`` as a plain sampler's does. The step to
``sigma_{N-1} -> 0`` is deterministic (x = D). 1 NFE per step; with the exact denoiser every step maps
``p(x; sigma_i)`` to ``p(x; sigma_{i+1})`` up to the DDIM step's error, part of which the fresh noise washes out.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .base import Callback, begin_run, check_inputs, evaluator, report, resolve_noise


@torch.no_grad()
def meng_stochastic(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    s_noise: float = 1.0,
    noise: object = None,
) -> torch.Tensor:
    """Meng et al. 2023's stochastic sampler: DDIM to ``sigmas[i+2]``, forward noise back to ``sigmas[i+1]``.

    ``noise``: per-sample seeds (``SampleNoise``) make the output batch-size invariant. The last step
    (to sigma = 0) and a one-step grid are deterministic.
    """
    sigmas = check_inputs(x, sigmas)
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "meng_stochastic")
    noise = resolve_noise(noise, x, sigmas)
    evaluate = evaluator(denoiser, x, cond, run)
    sig = sigmas.tolist()
    n = len(sig) - 1
    for i in run.steps(progress, "meng_stochastic"):
        sigma, sigma_next = sig[i], sig[i + 1]
        D = evaluate(x, sigma)
        report(callback, x, i, sigmas, sigma, D)
        if sigma_next == 0:
            x = D
            break
        sigma_far = sig[i + 2] if i + 2 <= n else 0.0
        x = torch.lerp(D, x, sigma_far / sigma)  # DDIM step of twice the length: sigma -> sigma_{i+2}
        x = x + noise(sigma, sigma_next) * (s_noise * math.sqrt(sigma_next**2 - sigma_far**2))
    return x
