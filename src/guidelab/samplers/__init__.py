"""Samplers: plain functions ``sampler(denoiser, x, sigmas, *, cond, callback, progress, ..., noise) -> x``.

``x`` is the starting sample at ``sigmas[0]``; ``sigmas`` decrease strictly and end in 0. Stochastic
samplers take ``noise``: a ``guidelab.rng.SampleNoise`` (per-sample seeds: batch-size invariant), a
:class:`BrownianNoise` or a noise sampler ``(sigma, sigma_next) -> tensor like x``; ``None`` uses
torch's global generator. ``info(name)`` gives NFE per step, order, stochasticity and the reference.
Samplers run under ``torch.no_grad()`` (guiders that need gradients enable them inside).
"""

from __future__ import annotations

from typing import NamedTuple

from ..errors import GuidelabError
from .ancestral import euler_ancestral
from .ddim import ddim, ddpm
from .dpm import dpm_2, dpm_2_ancestral
from .dpmpp import dpmpp_2m, dpmpp_2m_sde, dpmpp_2s_ancestral, dpmpp_3m_sde
from .edm import euler, heun
from .lms import lms
from .noise import BrownianNoise
from .sde import score_sde_pc
from .unipc import unipc


class Info(NamedTuple):
    """``nfe``: network evaluations per step (the step to sigma = 0 may take fewer); ``order``: global
    order of the deterministic solver (0: not an ODE solver); ``stochastic``: draws noise by default."""
    nfe: int
    order: int
    stochastic: bool
    reference: str


_INFO = {
    "euler": Info(1, 1, False, "Karras et al. 2022, Alg. 2 (Euler)"),
    "heun": Info(2, 2, False, "Karras et al. 2022, Alg. 2"),
    "euler_ancestral": Info(1, 0, True, "k-diffusion sample_euler_ancestral"),
    "dpm_2": Info(2, 2, False, "Lu et al. 2022 (DPM-Solver-2), k-diffusion sample_dpm_2"),
    "dpm_2_ancestral": Info(2, 0, True, "k-diffusion sample_dpm_2_ancestral"),
    "lms": Info(1, 4, False, "Adams-Bashforth, k-diffusion sample_lms"),
    "dpmpp_2s_ancestral": Info(2, 0, True, "Lu et al. 2022b (DPM-Solver++ 2S)"),
    "dpmpp_2m": Info(1, 2, False, "Lu et al. 2022b (DPM-Solver++ 2M)"),
    "dpmpp_2m_sde": Info(1, 0, True, "Lu et al. 2022b, k-diffusion sample_dpmpp_2m_sde"),
    "dpmpp_3m_sde": Info(1, 0, True, "k-diffusion sample_dpmpp_3m_sde"),
    "ddim": Info(1, 1, False, "Song et al. 2021 (DDIM), eta = 0 by default"),
    "ddpm": Info(1, 0, True, "Ho et al. 2020 (DDPM ancestral)"),
    "unipc": Info(1, 3, False, "Zhao et al. 2023 (UniPC-2 bh2 by default: order 3)"),
    "score_sde_pc": Info(2, 0, True, "Song et al. 2021 (PC sampler, 1 corrector step)"),
}
_REGISTRY = {name: globals()[name] for name in _INFO}


def names() -> list[str]:
    """Names of all samplers, usable with :func:`get`."""
    return sorted(_REGISTRY)


def get(name: str):
    """The sampler called ``name``; a clear error lists the known names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise GuidelabError(f"unknown sampler {name!r}; known samplers: {', '.join(names())}") from None


def info(name: str) -> Info:
    """NFE per step, order, stochasticity and reference of the sampler called ``name``."""
    get(name)
    return _INFO[name]


__all__ = ["get", "names", "info", "Info", "BrownianNoise", *_INFO]
