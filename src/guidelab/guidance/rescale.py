"""Guidance rescale; the method's documentation is :func:`rescale`'s docstring."""

from __future__ import annotations

import torch

from ._base import Guided
from ._spaces import check_space, from_space, to_space
from .protocols import Run


def _std(y: torch.Tensor) -> torch.Tensor:
    return y.flatten(1).std(1).reshape((-1,) + (1,) * (y.ndim - 1))


def rescale(guider: Guided, phi: float = 0.7, *, space: str = "v") -> Guided:
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    WACV 2024, arXiv 2305.08891, Sec. 3.4, eqs. 15-17) of ``guider`` (cfg, autoguidance, icg, tsg); same branches and cost.

    With ``y`` the prediction in the chosen space (paper: the v-prediction of their model)::

        y_cfg = y_u + w (y_c - y_u)                      (eq. 15, CFG)
        y_re  = y_cfg * std(y_c) / std(y_cfg)            (eq. 16, match the conditional's std)
        y     = phi y_re + (1 - phi) y_cfg               (eq. 17)

    std over all non-batch dims, per sample. Weight ``w`` as in :func:`~guidelab.guidance.cfg` (``w = 1``:
    no guidance; the paper and diffusers' ``guidance_scale`` use the same ``w``; ``guidance_rescale`` is
    ``phi``). ``phi = 0`` is plain CFG; the paper recommends ``phi = 0.7``. ``space``: ``"v"`` (paper;
    ComfyUI also rescales v), ``"eps"`` (diffusers rescales its model output, eps for eps-models) or
    ``"x0"``. CFG++ (``cfgpp``) is refused: rescale rewrites the output CFG++'s renoise step relies on.
    """
    check_space(space)

    def rule(
        D: torch.Tensor, D_ref: torch.Tensor, w: float | torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, run: Run | None
    ) -> torch.Tensor:
        y_c, y_u = to_space(D, x, sigma, space), to_space(D_ref, x, sigma, space)
        y_cfg = y_u.lerp(y_c, w)  # eq. 15
        y_re = y_cfg * (_std(y_c) / _std(y_cfg))  # eq. 16
        return from_space(y_cfg.lerp(y_re, phi), x, sigma, space)  # eq. 17

    return guider.with_rule(rule, f"rescale[{guider.name}]")
