"""Frequency-decoupled guidance; the method's documentation is :func:`fdg`'s docstring."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import check
from ._base import Guided, is_off
from ._spaces import check_space, from_space, to_space
from .protocols import Run


def _down(y: torch.Tensor) -> torch.Tensor:
    return F.avg_pool1d(y, 2) if y.ndim == 3 else F.avg_pool2d(y, 2)


def _up(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(y, size=like.shape[2:], mode="linear" if y.ndim == 3 else "bilinear", align_corners=False)


def pyramid(y: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Laplacian pyramid of signals [B, C, L] or images [B, C, H, W]: ``levels - 1`` band-pass residuals
    (finest first) and the low-pass rest; :func:`collapse` inverts it."""
    out, cur = [], y
    for _ in range(levels - 1):
        low = _down(cur)
        out.append(cur - _up(low, cur))
        cur = low
    return out + [cur]


def collapse(bands: list[torch.Tensor]) -> torch.Tensor:
    y = bands[-1]
    for b in reversed(bands[:-1]):
        y = _up(y, b) + b
    return y


def fdg(guider: Guided, w_low: float = 1.0, *, levels: int = 2, space: str = "x0") -> Guided:
    """FDG, frequency-decoupled guidance (Sadat et al. 2025, arXiv 2506.19713, Alg. 2) of ``guider``
    (cfg, autoguidance, icg, tsg); same branches and cost.

    Both predictions are split into a Laplacian pyramid (band ``0`` the finest, band ``levels - 1`` the
    low-pass rest); each band is guided with its own weight and the pyramid collapsed::

        y_k = u_k + w_k (c_k - u_k),   w_k = w (the guider's weight) for the high bands, w_low for the last

    Paper: strong guidance on high frequencies (detail), weak on low ones (colour, layout, variation).
    ``w_low = w`` is CFG (the pyramid is linear and collapses back exactly, up to rounding).
    Pyramid: 2x average pooling down, (bi)linear up (the paper uses kornia's 5x5 Gaussian pyrdown/pyrup).
    Inputs: [B, C, L] signals or [B, C, H, W] images.
    """
    check_space(space)
    check(isinstance(levels, int) and levels >= 2, f"fdg levels must be an integer >= 2, got {levels!r}")
    check(
        not is_off(guider.w) or w_low == 1,
        f"fdg with w = 1 evaluates only the main branch; w_low={w_low} "
        "needs w != 1 (use w = 1 + tiny for low-band-only guidance)",
    )

    def rule(
        D: torch.Tensor, D_ref: torch.Tensor, w: float | torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, run: Run | None
    ) -> torch.Tensor:
        check(D.ndim in (3, 4), f"fdg needs [B, C, L] or [B, C, H, W] predictions, got shape {list(D.shape)}")
        c, u = pyramid(to_space(D, x, sigma, space), levels), pyramid(to_space(D_ref, x, sigma, space), levels)
        ws = [w] * (levels - 1) + [w_low]
        return from_space(collapse([uk.lerp(ck, wk) for ck, uk, wk in zip(c, u, ws)]), x, sigma, space)

    return guider.with_rule(rule, f"fdg[{guider.name}]")
