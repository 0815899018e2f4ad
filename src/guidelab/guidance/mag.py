"""Magnitude-aware guidance (MAMBO-G); the method's documentation is :func:`mag`'s docstring."""

from __future__ import annotations

import torch

from ..denoisers import bcast
from ..errors import check
from ._base import Guided
from ._spaces import check_space, from_space, to_space
from .protocols import Run


def mag(guider: Guided, *, alpha: float = 8.0, space: str = "flow") -> Guided:
    """MAG / MAMBO-G, magnitude-aware mitigation for boosted guidance (Zhu et al. 2025, arXiv 2508.03442;
    diffusers ``MagnitudeAwareGuidance``) of ``guider`` (cfg, autoguidance, icg, tsg); same branches and cost.

    Per sample, in ``space`` (paper: the flow models' velocity)::

        r   = ||y_c - y_u|| / ||y_u||                  (update-to-prediction magnitude ratio)
        w'  = 1 + (w - 1) exp(-alpha r)
        y   = y_u + w' (y_c - y_u)

    Large updates (early, high-noise steps) get less guidance. Weight ``w`` as CFG (``w = 1``: no
    guidance); ``alpha = 0`` is CFG; diffusers' defaults ``guidance_scale = 10``, ``alpha = 8``.
    """
    check_space(space)
    check(alpha >= 0, f"mag alpha must be >= 0, got {alpha}")

    def rule(
        D: torch.Tensor, D_ref: torch.Tensor, w: float | torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, run: Run | None
    ) -> torch.Tensor:
        y_c, y_u = to_space(D, x, sigma, space), to_space(D_ref, x, sigma, space)
        r = bcast((y_c - y_u).flatten(1).norm(dim=1) / y_u.flatten(1).norm(dim=1).clamp_min(1e-30), y_c)
        w_eff = 1 + (w - 1) * torch.exp(-alpha * r)
        return from_space(y_u.lerp(y_c, w_eff), x, sigma, space)

    return guider.with_rule(rule, f"mag[{guider.name}]")
