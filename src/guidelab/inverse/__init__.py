"""Conditioning an unconditional denoiser at sampling time: inpainting, reference guidance, inverse
problems and time series. One file per method (docs/INVERSE.md compares them against the exact
posterior, :func:`guidelab.toy.linear_posterior`).

Samplers keep the library's signature, ``method(denoiser, x, sigmas, operator, y, *, ..., noise=None) -> x``
(``x`` the starting noise at ``sigmas[0]``); :class:`Counting` counts a denoiser's evaluations (NFE).
"""

from ._common import Counting
from .dps import dps
from .ilvr import ilvr
from .operators import Blur, Downsample, Grayscale, Mask, Matrix, Operator
from .repaint import jump_schedule, repaint
from .score_sde_imputation import score_sde_colorize, score_sde_impute
from .sdg import EnergyGuided, class_energy, energy, guided_tts, reference_energy
from .steered import steered
from .tsdiff import (
    quantile_levels,
    tsdiff_guided,
    tsdiff_refine,
    tsdiff_sigma,
    tsdiff_sigmas,
)

__all__ = [
    "Blur",
    "Counting",
    "Downsample",
    "EnergyGuided",
    "Grayscale",
    "Mask",
    "Matrix",
    "Operator",
    "class_energy",
    "dps",
    "energy",
    "guided_tts",
    "ilvr",
    "jump_schedule",
    "quantile_levels",
    "reference_energy",
    "repaint",
    "score_sde_colorize",
    "score_sde_impute",
    "steered",
    "tsdiff_guided",
    "tsdiff_refine",
    "tsdiff_sigma",
    "tsdiff_sigmas",
]
