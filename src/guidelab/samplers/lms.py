"""Linear multistep (Adams-Bashforth) on the PF-ODE in sigma, as k-diffusion's ``sample_lms``."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import check
from .base import Callback, begin_run, check_inputs, evaluator, report


def lms_coefficients(nodes: list[float], a: float, b: float) -> list[float]:
    """``c_j = int_a^b l_j(tau) dtau`` for the Lagrange basis ``l_j`` on ``nodes`` (exact polynomial integral,
    plain Python: a handful of nodes)."""
    out = []
    for j, t_j in enumerate(nodes):
        poly, denom = [1.0], 1.0  # coefficients of prod_{k != j} (tau - t_k), low first
        for k, t_k in enumerate(nodes):
            if k != j:
                poly = [0.0] + poly
                for m in range(len(poly) - 1):
                    poly[m] -= t_k * poly[m + 1]
                denom *= t_j - t_k
        F = lambda t, poly=poly: sum(c * t ** (m + 1) / (m + 1) for m, c in enumerate(poly))  # noqa: E731  antiderivative
        out.append((F(b) - F(a)) / denom)
    return out


@torch.no_grad()
def lms(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    order: int = 4,
    noise: object = None,
) -> torch.Tensor:
    """Adams-Bashforth of ``order`` (1 NFE per step): ``x_next = x + sum_j c_j d_{i-j}`` where ``c_j``
    integrates the polynomial through the last derivatives ``d = (x - D) / sigma`` over [sigma, sigma_next].
    Lower orders while the history fills up. Deterministic: ``noise`` is accepted and not used."""
    check(isinstance(order, int) and 1 <= order <= 8, f"order must be an integer in 1..8, got {order!r}")
    sigmas = check_inputs(x, sigmas)
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "lms")
    evaluate = evaluator(denoiser, x, cond, run)
    sig = sigmas.tolist()
    # c_ij / sigma_{i-j}: the update is x + sum_j c_ij (x_{i-j} - D_{i-j}) / sigma_{i-j} (d = (x - D) / sigma)
    coeffs = [
        [c / sig[i - j] for j, c in enumerate(lms_coefficients(sig[max(i - order + 1, 0) : i + 1][::-1], sig[i], sig[i + 1]))]
        for i in range(len(sig) - 1)
    ]
    es: list[torch.Tensor] = []
    for i in run.steps(progress, "lms"):
        D = evaluate(x, sig[i])
        report(callback, x, i, sigmas, sig[i], D)
        es = ([x - D] + es)[:order]  # newest first: e_i, e_{i-1}, ...
        x = x.add(es[0], alpha=coeffs[i][0])
        for c, e in zip(coeffs[i][1:], es[1:]):
            x.add_(e, alpha=c)
    return x
