"""Tangential damping CFG; the method's documentation is :func:`tcfg`'s docstring."""

from __future__ import annotations

import torch

from ._base import Guided
from ._spaces import check_space, from_space, to_space
from .protocols import Run


def damp_tangent(y_c: torch.Tensor, y_u: torch.Tensor) -> torch.Tensor:
    """``y_u`` projected on the first right singular vector ``v1`` of ``[y_c; y_u]`` (per sample, float64):
    the tangential component of ``y_u`` (along ``v2``) removed. Shapes [batch, ...] -> [batch, ...]."""
    X = torch.stack([y_c.flatten(1), y_u.flatten(1)], 1).double()  # [B, 2, d]
    _, _, Vh = torch.linalg.svd(X, full_matrices=False)
    v1 = Vh[:, 0]  # [B, d]
    u = (X[:, 1] * v1).sum(1, keepdim=True) * v1
    return u.reshape(y_u.shape).to(y_u.dtype)


def tcfg(guider: Guided, *, space: str = "eps") -> Guided:
    """TCFG, tangential damping CFG (Kwon et al. 2025, arXiv 2503.18137, Sec. 4, Alg. 1) of ``guider``
    (cfg, autoguidance, icg, tsg); same branches and cost.

    Per sample, with ``y`` the prediction in ``space`` (paper: eps) flattened to a row::

        [y_c; y_u] = U S V^T                       (SVD of the 2 x d matrix)
        y_u' = (y_u . v1) v1                       (v1: first right singular vector; the v2 part is dropped)
        y    = y_u' + w (y_c - y_u')

    Weight ``w`` as CFG (``w = 1``: no guidance); no other parameter. When ``y_c`` and ``y_u`` are
    parallel nothing is removed and TCFG is CFG.
    """
    check_space(space)

    def rule(
        D: torch.Tensor, D_ref: torch.Tensor, w: float | torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, run: Run | None
    ) -> torch.Tensor:
        y_c, y_u = to_space(D, x, sigma, space), to_space(D_ref, x, sigma, space)
        return from_space(damp_tangent(y_c, y_u).lerp(y_c, w), x, sigma, space)

    return guider.with_rule(rule, f"tcfg[{guider.name}]")
