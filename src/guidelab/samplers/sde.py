"""Predictor-corrector sampling of the VE SDE (Song et al. 2021, Alg. 2 / Sec. 4.2; "score_sde_pc"):
reverse-diffusion predictor and Langevin corrector."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import GuidelabError, check
from .base import Callback, begin_run, check_inputs, evaluator, report, resolve_noise
from .noise import BrownianNoise


@torch.no_grad()
def score_sde_pc(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    snr: float = 0.16,
    corrector_steps: int = 1,
    noise: object = None,
) -> torch.Tensor:
    """Per step: ``corrector_steps`` Langevin corrections at sigma, then one reverse-diffusion step.

    Score ``s = (D - x) / sigma^2``. Corrector (their Alg. 4): ``x <- x + eps s + sqrt(2 eps) z`` with
    ``eps = 2 (snr sigma)^2``. Song et al. set ``eps = 2 (snr |z| / |s|)^2`` with the norms averaged over
    the batch, which makes a sample depend on its batch; per-sample norms instead blow up samples near a
    mode (tiny |s|) in low dimension. We use the typical values ``|z| = sqrt(d)``, ``|s| = sqrt(d) / sigma``.
    Predictor (their eq. 46, VE): ``x <- x + (sigma^2 - sigma_next^2) s + sqrt(sigma^2 - sigma_next^2) z``,
    noise-free on the step to 0 (which returns D). 1 + corrector_steps NFE per step.
    """
    check(
        isinstance(corrector_steps, int) and corrector_steps >= 0,
        f"corrector_steps must be an integer >= 0, got {corrector_steps!r}",
    )
    check(snr >= 0, f"snr must be >= 0, got {snr}")
    if isinstance(noise, BrownianNoise):
        raise GuidelabError(
            "score_sde_pc draws Langevin noise that belongs to no time interval: use SampleNoise or a noise "
            "sampler, not BrownianNoise"
        )
    sigmas = check_inputs(x, sigmas)
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "score_sde_pc")
    noise = resolve_noise(noise, x, sigmas)
    evaluate = evaluator(denoiser, x, cond, run)
    sig = sigmas.tolist()
    for i in run.steps(progress, "score_sde_pc"):
        sigma, sigma_next = sig[i], sig[i + 1]
        eps = 2 * (snr * sigma) ** 2  # Langevin step size
        for _ in range(corrector_steps):
            x = torch.lerp(x, evaluate(x, sigma), eps / sigma**2)  # x + eps s, s = (D - x) / sigma^2
            x.add_(noise(sigma, sigma_next), alpha=math.sqrt(2 * eps))
        D = evaluate(x, sigma)
        report(callback, x, i, sigmas, sigma, D)
        if sigma_next == 0:
            x = D  # x + sigma^2 s
            break
        g2 = sigma**2 - sigma_next**2
        x = torch.lerp(x, D, g2 / sigma**2).add_(noise(sigma, sigma_next), alpha=math.sqrt(g2))
    return x
