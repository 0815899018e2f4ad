"""Samplers: plain functions ``sampler(denoiser, x, sigmas, *, cond, callback, progress, ..., noise) -> x``.

``x`` is the starting sample at ``sigmas[0]``; ``sigmas`` decrease strictly and end in 0. Stochastic
samplers take ``noise``: a ``guidelab.rng.SampleNoise`` (per-sample seeds: batch-size invariant), a
:class:`BrownianNoise` or a noise sampler ``(sigma, sigma_next) -> tensor like x``; ``None`` uses
torch's global generator. ``info(name)`` gives NFE per step, order, stochasticity, the reference and
``supports``, the sampler features a guider may require (``guider.requires``; CFG++ needs "renoise").
Each sampler checks ``guider.requires <= supports`` first and creates one ``guidance.Run`` per run.
Samplers run under ``torch.no_grad()`` (guiders that need gradients enable them inside).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import GuidelabError
from .ancestral import euler_ancestral
from .base import allow_nonfinite
from .catalog import INFO, Info
from .ddim import ddim, ddpm
from .dpm import dpm_2, dpm_2_ancestral
from .dpm_solver_v3 import EMS, compute_ems, dpm_solver_v3, world_ems
from .dpmpp import dpmpp_2m, dpmpp_2m_sde, dpmpp_2s_ancestral, dpmpp_3m_sde
from .edm import euler, heun
from .lms import lms
from .meng import meng_stochastic
from .noise import BrownianNoise
from .pcg import pcg
from .sde import score_sde_pc
from .unipc import unipc

_REGISTRY = {name: globals()[name] for name in INFO}


def names() -> list[str]:
    """Names of all samplers, usable with :func:`get`."""
    return sorted(_REGISTRY)


def get(name: str) -> Callable[..., torch.Tensor]:
    """The sampler called ``name``; a clear error lists the known names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise GuidelabError(f"unknown sampler {name!r}; known samplers: {', '.join(names())}") from None


def info(name: str) -> Info:
    """NFE per step, order, stochasticity, reference and supported features of the sampler called ``name``."""
    get(name)
    return INFO[name]


__all__ = ["get", "names", "info", "Info", "BrownianNoise", "allow_nonfinite", "EMS", "compute_ems", "world_ems", *INFO]
