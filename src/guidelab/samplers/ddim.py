"""DDIM (Song et al. 2021, eq. 12) and DDPM ancestral sampling (Ho et al. 2020, eqs. 6-7).

Both are written in EDM coordinates: a VP model's ``x_VP = x / sqrt(1 + sigma^2)`` and
``alpha_bar = 1 / (1 + sigma^2)``. Dividing DDIM's update by ``sqrt(alpha_bar_prev)`` gives
``x_next = D + sqrt(sigma_next^2 - s^2) (x - D) / sigma + s n`` with
``s = eta sigma_next sqrt(1 - sigma_next^2 / sigma^2)`` -- an Euler step to ``sigma_down`` plus noise
``sigma_up = s``, i.e. exactly the ancestral step. So the results equal diffusers' DDIMScheduler /
DDPMScheduler on the same timesteps (see the tests), and work for any denoiser.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import check
from .base import Callback, ancestral_loop, euler_step


def ddim(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise: object = None,
) -> torch.Tensor:
    """DDIM with stochasticity ``eta`` (0: deterministic DDIM = Euler on the PF-ODE; 1: DDPM posterior); 1 NFE per step.

    For a discrete-time model pass the sigmas of its timesteps (``schedules.discrete``).
    """
    return ancestral_loop(
        denoiser,
        x,
        sigmas,
        euler_step,
        name="ddim",
        cond=cond,
        callback=callback,
        progress=progress,
        eta=eta,
        s_noise=s_noise,
        noise=noise,
    )


def _ddpm_large(sigma: float, sigma_next: float) -> tuple[float, float]:
    """Posterior mean (sigma_down = sigma_next^2 / sigma) and noise std sqrt(beta_t / alpha_bar_prev) (beta_t "fixed_large")."""
    beta_over_abar = (sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)
    return sigma_next**2 / sigma, math.sqrt(beta_over_abar)


def ddpm(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    variance: str = "small",
    s_noise: float = 1.0,
    noise: object = None,
) -> torch.Tensor:
    """DDPM ancestral sampling: ``x_next ~ N(posterior mean, var)``, 1 NFE per step, no noise on the last step.

    ``variance``: "small" (posterior variance beta~_t; the same as ``ddim(eta=1)``) or "large" (beta_t of
    the VP chain between the two sigmas, ``(sigma^2 - sigma_next^2) (1 + sigma_next^2) / (1 + sigma^2)`` in
    EDM units).
    """
    check(variance in ("small", "large"), f"variance must be 'small' or 'large', got {variance!r}")
    split = _ddpm_large if variance == "large" else None
    return ancestral_loop(
        denoiser,
        x,
        sigmas,
        euler_step,
        name="ddpm",
        cond=cond,
        callback=callback,
        progress=progress,
        eta=1.0,
        split=split,
        s_noise=s_noise,
        noise=noise,
    )
