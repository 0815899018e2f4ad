"""CFG-Renorm / CFGNorm; the method's documentation is :func:`cfg_norm`'s docstring."""

from __future__ import annotations

import torch

from ..errors import check
from ._base import Guided
from ._spaces import check_space, from_space, to_space
from .protocols import Run


def _norm(y: torch.Tensor, per: str) -> torch.Tensor:
    if per == "sample":
        return y.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (y.ndim - 1))
    return y.norm(dim=1, keepdim=True)  # over channels, per position


def cfg_norm(guider: Guided, *, per: str = "channel", space: str = "x0") -> Guided:
    """CFG-Renorm (Lumina-Next, Zhuo et al. 2024, arXiv 2406.18583, Sec. 3.3) / ComfyUI's CFGNorm of
    ``guider`` (cfg, autoguidance, icg, tsg); same branches and cost.

    The guided prediction is shrunk, never grown, to the conditional prediction's norm::

        y = y_cfg min(1, ||y_c|| / ||y_cfg||)

    norms over the channel dim at each position (``per="channel"``, Lumina and ComfyUI) or over the
    whole sample (``per="sample"``). ``space``: ``"x0"`` (ComfyUI's denoised), ``"flow"`` (Lumina's
    velocity), ``"eps"``, ``"v"``. Weight ``w`` as CFG (``w = 1``: no guidance). Where ``||y_cfg|| <= ||y_c||``
    it is CFG.
    """
    check_space(space)
    check(per in ("channel", "sample"), f"cfg_norm per must be 'channel' or 'sample', got {per!r}")

    def rule(
        D: torch.Tensor, D_ref: torch.Tensor, w: float | torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, run: Run | None
    ) -> torch.Tensor:
        y_c, y_u = to_space(D, x, sigma, space), to_space(D_ref, x, sigma, space)
        y = y_u.lerp(y_c, w)
        scale = (_norm(y_c, per) / _norm(y, per).clamp_min(1e-30)).clamp_max(1.0)
        return from_space(y * scale, x, sigma, space)

    return guider.with_rule(rule, f"cfg_norm[{guider.name}]")
