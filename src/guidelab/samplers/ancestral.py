"""Euler ancestral sampling: an Euler step to sigma_down, then fresh noise of std sigma_up."""

from __future__ import annotations

from typing import Callable

import torch

from .base import Callback, ancestral_loop, euler_step


def euler_ancestral(
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
    """Euler ancestral (1 NFE per step); ``eta = 1`` adds the DDPM posterior noise, ``eta = 0`` is ``euler``.

    In EDM coordinates this is exactly DDIM with the same ``eta`` (see :func:`guidelab.samplers.ddim`).
    """
    return ancestral_loop(
        denoiser,
        x,
        sigmas,
        euler_step,
        name="euler_ancestral",
        cond=cond,
        callback=callback,
        progress=progress,
        eta=eta,
        s_noise=s_noise,
        noise=noise,
    )
