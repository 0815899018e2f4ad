"""Score-SDE imputation and colourisation (Song et al., ICLR 2021, arXiv 2011.13456, Sec. 5 and App. I.2).

Predictor-corrector sampling of the VE SDE (:func:`guidelab.samplers.score_sde_pc`: Langevin corrector
with ``eps = 2 (snr sigma)^2``, reverse-diffusion predictor) where, after every corrector and every
predictor update, the known dimensions are replaced by the observation forward-noised to the level
the sample is at: ``x <- x - P x + A^+ y + sigma P n`` (``P = A^+ A``). For a mask that is
"known pixels <- y + sigma n"; for colourisation A is the channel mean
(:class:`~guidelab.inverse.Grayscale`) and ``P`` projects on their orthonormal decoupling's gray
channel ``(1, 1, 1) / sqrt(3)``, which is the same thing. The last predictor step returns the
denoised mean (their ``denoise=True``) with the known part equal to ``y``.

Differences from the official code (yang-song/score_sde_pytorch ``controllable_generation.py``): the
replacement after the predictor uses the noise level *before* the step (``vec_t``); here the one
after it. Their start is ``y`` on the known part and prior noise elsewhere; here ``x`` as given.

NFE: ``1 + corrector_steps`` per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import GuidelabError
from ..samplers.base import Callback, begin_run, check_inputs, report, resolve_noise
from ..samplers.edm import Noise
from ._common import check_int, check_number, lift, prepared, replace_known
from .operators import Grayscale, Operator, need_projection


@torch.no_grad()
def score_sde_impute(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    operator: Operator,
    y: torch.Tensor,
    *,
    snr: float = 0.16,
    corrector_steps: int = 1,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    noise: Noise = None,
) -> torch.Tensor:
    """Impute ``x`` (noise at ``sigmas[0]``) so that ``operator(x) = y``: PC sampling with the known part replaced.

    ``snr = 0.16`` and one corrector step are Song et al.'s CIFAR-10 / VE defaults.
    """
    sigmas = check_inputs(x, sigmas)
    op = need_projection(operator, "Score-SDE imputation")
    op, y = prepared(op, y, x)
    check_int(corrector_steps, "corrector_steps", 0)
    check_number(snr, "snr")
    if hasattr(noise, "tree_sampler"):
        raise GuidelabError("score_sde_impute draws Langevin noise that belongs to no time interval: use SampleNoise")
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "score_sde_impute", frozenset())
    noise = resolve_noise(noise, x, sigmas)
    y_lift = lift(op, y, x)
    sig, batch, cond = sigmas.tolist(), x.shape[0], cond or {}

    def D_of(x_: torch.Tensor, s: float) -> torch.Tensor:
        return denoiser(x_, torch.full((batch,), s, dtype=x.dtype, device=x.device), **cond)

    for i in run.steps(progress, "score_sde_impute"):
        sigma, sigma_next = sig[i], sig[i + 1]
        eps = 2 * (snr * sigma) ** 2
        for _ in range(corrector_steps):  # Langevin corrector (their Alg. 4)
            x = torch.lerp(x, D_of(x, sigma), eps / sigma**2)
            x = x + math.sqrt(2 * eps) * noise(sigma, sigma_next)
            x = replace_known(x, op, y_lift, sigma, noise(sigma, sigma_next))
        D = D_of(x, sigma)
        report(callback, x, i, sigmas, sigma, D)
        if sigma_next == 0:
            return replace_known(D, op, y_lift, 0.0, None)  # denoised mean, known part = y
        g2 = sigma**2 - sigma_next**2  # reverse-diffusion predictor (eq. 46)
        x = torch.lerp(x, D, g2 / sigma**2) + math.sqrt(g2) * noise(sigma, sigma_next)
        x = replace_known(x, op, y_lift, sigma_next, noise(sigma, sigma_next))
    return x


def score_sde_colorize(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    gray: torch.Tensor,
    *,
    channel: int = 0,
    **options: Any,
) -> torch.Tensor:
    """Colourise: ``gray`` is the channel mean of the wanted sample (shaped like one sample without the
    channel axis, or [B, ...]); ``channel`` the channel axis of a sample. Options as :func:`score_sde_impute`."""
    return score_sde_impute(denoiser, x, sigmas, Grayscale(tuple(x.shape[1:]), channel), gray, **options)
