"""DPM-Solver-2 in k-diffusion's form (Lu et al. 2022): midpoint steps in sigma, midpoint at the
geometric mean; deterministic with EDM churn, or ancestral."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .base import Callback, ancestral_loop, churn_loop, dpm2_step


def dpm_2(
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
    noise: object = None,
) -> torch.Tensor:
    """2nd-order midpoint method (2 NFE per step, 1 on the last), with EDM churn; arguments as in ``euler``."""
    return churn_loop(
        denoiser,
        x,
        sigmas,
        dpm2_step,
        name="dpm_2",
        cond=cond,
        callback=callback,
        progress=progress,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        noise=noise,
    )


def dpm_2_ancestral(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise: object = None,
) -> torch.Tensor:
    """Ancestral sampling with midpoint steps to sigma_down (2 NFE per step, 1 on the last)."""
    return ancestral_loop(
        denoiser,
        x,
        sigmas,
        dpm2_step,
        name="dpm_2_ancestral",
        cond=cond,
        callback=callback,
        progress=progress,
        eta=eta,
        s_noise=s_noise,
        noise=noise,
    )
