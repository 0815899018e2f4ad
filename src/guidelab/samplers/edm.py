"""The EDM samplers (Karras et al. 2022, Algorithm 2): Euler and Heun with optional churn."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..rng import NoiseSampler, SampleNoise
from .base import Callback, churn_loop, euler_step, heun_step
from .noise import BrownianNoise

#: what ``noise=`` takes (:func:`guidelab.samplers.base.resolve_noise`): None = torch's global generator.
Noise = SampleNoise | BrownianNoise | NoiseSampler | None


def euler(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise: Noise = None,
) -> torch.Tensor:
    """Euler on the probability-flow ODE (1 NFE per step), with EDM churn when ``s_churn > 0``.

    ``x`` is the starting sample at ``sigmas[0]`` (noise already scaled); ``cond`` is passed to the
    denoiser as keyword arguments; ``noise`` is a ``SampleNoise`` (per-sample seeds), a
    ``BrownianNoise`` or a noise sampler ``(sigma, sigma_next) -> tensor like x``.
    """
    return churn_loop(
        denoiser,
        x,
        sigmas,
        euler_step,
        name="euler",
        cond=cond,
        callback=callback,
        progress=progress,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        noise=noise,
    )


def heun(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise: Noise = None,
) -> torch.Tensor:
    """The EDM sampler (Algorithm 2): Heun's 2nd-order method, Euler on the last step to sigma = 0.

    2 NFE per step except the last; arguments as in :func:`euler`. With CFG++ (``guidance.cfgpp``, the
    renoise step): guidelab's Heun form of CFG++ (not a published one), :func:`~guidelab.samplers.base.heun_step`.
    """
    return churn_loop(
        denoiser,
        x,
        sigmas,
        heun_step,
        name="heun",
        cond=cond,
        callback=callback,
        progress=progress,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        noise=noise,
    )
