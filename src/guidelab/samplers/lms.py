"""Linear multistep (Adams-Bashforth) on the PF-ODE in sigma, as k-diffusion's ``sample_lms``."""

from __future__ import annotations

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from ..errors import check
from ._common import Callback, check_inputs, evaluator, report, steps


def lms_coefficients(nodes: list[float], a: float, b: float) -> list[float]:
    """``c_j = int_a^b l_j(tau) dtau`` for the Lagrange basis ``l_j`` on ``nodes`` (exact polynomial integral)."""
    out = []
    for j, t_j in enumerate(nodes):
        others = [t for k, t in enumerate(nodes) if k != j]
        poly = P.polyint(P.polyfromroots(others) / np.prod([t_j - t for t in others]))
        out.append(float(P.polyval(b, poly) - P.polyval(a, poly)))
    return out


@torch.no_grad()
def lms(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict | None = None,
        callback: Callback | None = None, progress: bool = False, order: int = 4, noise=None) -> torch.Tensor:
    """Adams-Bashforth of ``order`` (1 NFE per step): ``x_next = x + sum_j c_j d_{i-j}`` where ``c_j``
    integrates the polynomial through the last derivatives ``d = (x - D) / sigma`` over [sigma, sigma_next].
    Lower orders while the history fills up. Deterministic: ``noise`` is accepted and not used."""
    check(isinstance(order, int) and 1 <= order <= 8, f"order must be an integer in 1..8, got {order!r}")
    sigmas = check_inputs(x, sigmas)
    evaluate = evaluator(denoiser, x, cond)
    sig = sigmas.tolist()
    ds: list[torch.Tensor] = []
    for i in steps(sigmas, progress, "lms"):
        D = evaluate(x, sig[i])
        report(callback, x, i, sigmas, sig[i], D)
        ds = ([(x - D) / sig[i]] + ds)[:order]                   # newest first: d_i, d_{i-1}, ...
        coeffs = lms_coefficients(sig[i - len(ds) + 1:i + 1][::-1], sig[i], sig[i + 1])
        x = x + sum(c * d for c, d in zip(coeffs, ds))
    return x
