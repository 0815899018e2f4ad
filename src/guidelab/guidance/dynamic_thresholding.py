"""Dynamic thresholding; the method's documentation is :func:`dynamic_thresholding`'s docstring."""

from __future__ import annotations

import torch

from ..denoisers import bcast
from ..errors import check
from ._base import Guided
from .protocols import Run


def threshold(D: torch.Tensor, p: float, c: float, s_max: float | None = None) -> torch.Tensor:
    """``clip(D, -s, s) c / s`` with ``s = clamp(quantile_p |D|, c, s_max)`` per sample."""
    s = torch.quantile(D.abs().flatten(1).double(), p, dim=1).clamp(c, s_max).to(D.dtype)
    s = bcast(s, D)
    return torch.maximum(torch.minimum(D, s), -s) * (c / s)


def dynamic_thresholding(
    guider: Guided, *, percentile: float = 0.995, max_value: float = 1.0, s_max: float | None = None
) -> Guided:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, arXiv 2205.11487, Sec. 2.3) of the guided x0
    prediction of ``guider`` (cfg, autoguidance, icg, tsg); same branches and cost.

    Per sample, on ``D = D_u + w (D_c - D_u)``::

        s = clamp(percentile_p(|D|), max_value, s_max);   D = clip(D, -s, s) max_value / s

    ``max_value = 1`` is Imagen's ([-1, 1] images); set it to the data's range. ``D`` inside the range:
    plain CFG. ``s_max``: an upper bound of ``s`` (diffusers' ``sample_max_value``, e.g. 1.5 in DeepFloyd
    IF; ``None``: unbounded, the paper's); ``s_max = max_value`` is static clipping. Weight ``w`` as CFG
    (``w = 1``: no guidance, nothing thresholded); Imagen's ``p = 0.995``.
    """
    check(0 < percentile <= 1, f"dynamic_thresholding percentile must be in (0, 1], got {percentile}")
    check(max_value > 0, f"dynamic_thresholding max_value must be > 0, got {max_value}")
    check(s_max is None or s_max >= max_value, f"dynamic_thresholding s_max must be >= max_value={max_value}, got {s_max}")

    def rule(
        D: torch.Tensor, D_ref: torch.Tensor, w: float | torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, run: Run | None
    ) -> torch.Tensor:
        return threshold(D_ref.lerp(D, w), percentile, max_value, s_max)

    return guider.with_rule(rule, f"dynamic_thresholding[{guider.name}]")
