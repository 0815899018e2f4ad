"""UniPC (Zhao et al. 2023, arXiv 2302.04867): multistep predictor UniP-p with corrector UniC-p, in
data prediction (their Alg. 2 / "B(h)" variants), written in EDM coordinates.

With ``lambda = -log sigma``, ``h = lambda_next - lambda``, the predictor of order p is
``x_next = (sigma_next / sigma) x + (1 - e^{-h}) D_0 - B(h) sum_k rho_k D1_k`` (their eq. 8 with
``D1_k = (D_{-k} - D_0) / r_k``, ``r_k = (lambda_{-k} - lambda) / h``); ``rho`` solves
``R_p(h) rho = phi_p(h) / B(h)`` (their Theorem 3.1). The corrector re-does the last step with the
fresh evaluation at x_next included (order p + 1, no extra NFE). ``B(h) = -h`` (bh1) or ``e^{-h} - 1`` (bh2).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch

from ..errors import check
from .base import Callback, begin_run, check_inputs, evaluator, report


def _weights(sig: list[float], i: int, p: int, variant: str, corrector: bool) -> list[float]:
    """The step sig[i] -> sig[i+1]'s weights ``-B rho_k / r_k`` on ``D1_k`` (plain floats: they depend only on
    the step grid, so a run computes them all before its first evaluation); UniP-p's p - 1 history weights,
    or with ``corrector`` UniC-p's p weights (the last one on the evaluation at the predicted point)."""
    sigma, sigma_next = sig[i], sig[i + 1]
    h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda, lambda = -log sigma
    hh = -h  # data prediction
    hphi_1 = math.expm1(hh)
    B = hh if variant == "bh1" else hphi_1
    rks = [(math.log(sigma) - math.log(sig[i - k])) / h for k in range(1, p)] + [1.0]
    # b_k = k! h phi_{k+1}(hh) / B(h), with h phi_{k+1} = h phi_k / hh - 1 / k!  (their eq. 6 and Alg. 2)
    b, hphi_k, fact = [], hphi_1 / hh - 1, 1
    for k in range(1, p + 1):
        b.append(hphi_k * fact / B)
        fact *= k + 1
        hphi_k = hphi_k / hh - 1 / fact
    R = np.array([[r ** (k - 1) for r in rks] for k in range(1, p + 1)])
    if not corrector:  # predictor: p - 1 weights
        rho = [] if p == 1 else [0.5] if p == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    else:  # corrector: p weights, the last on D_next - D0
        rho = [0.5] if p == 1 else np.linalg.solve(R, b).tolist()
    return [-B * r / r_k for r, r_k in zip(rho, rks)]


@functools.lru_cache(maxsize=64)
def _plan(
    sig: tuple[float, ...], order: int, variant: str, corrector: bool, lower_order_final: bool
) -> tuple[list[int], list[list[float]], list[list[float]]]:
    """Each step's order (the history holds min(order, i + 1) evaluations) and its predictor / corrector
    weights: they depend only on the grid, so they are computed before the first evaluation, once per grid
    (cached: a job samples block after block on one grid; the lists are only read)."""
    n = len(sig) - 1
    orders = [min(order, i + 1, n - i if lower_order_final else order) for i in range(n)]
    last = n - 1 if sig[-1] == 0 else n  # the step to sigma = 0 returns D: no weights
    pred = [_weights(list(sig), i, orders[i], variant, False) for i in range(last)]
    corr = [_weights(list(sig), i, orders[i], variant, True) for i in range(last)] if corrector else []
    return orders, pred, corr


def _step(
    x: torch.Tensor, ratio: float, weights: list[float], hist: list[torch.Tensor], p: int, D_next: torch.Tensor | None = None
) -> torch.Tensor:
    """One UniP-p step from ``hist = [D_i, D_{i-1}, ...]`` with ``ratio = sigma_next / sigma`` and the step's
    ``_weights``; with ``D_next`` (the evaluation at the predicted point) the UniC-p corrector instead."""
    D0 = hist[0]
    # x_next = (sigma_next/sigma) x - hphi_1 D0 - B sum_k rho_k D1_k, with D1_k = (D_{-k} - D0) / r_k for the
    # history and D1 = D_next - D0 (r = 1) for the corrector's last term; hphi_1 = sigma_next/sigma - 1.
    x_next = torch.lerp(D0, x, ratio)
    terms = hist[1:p] + ([D_next] if D_next is not None else [])
    for w, D_k in zip(weights, terms):
        x_next.add_(D_k - D0, alpha=w)
    return x_next


@torch.no_grad()
def unipc(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    order: int = 2,
    variant: str = "bh2",
    corrector: bool = True,
    lower_order_final: bool = True,
    noise: object = None,
) -> torch.Tensor:
    """UniPC-p (1 NFE per step). ``order`` 1..3; ``variant`` "bh1" or "bh2"; ``corrector=False`` gives UniP.

    Lower orders while the history fills up; with ``lower_order_final`` the order is at most the number
    of steps left (diffusers' default); the step to sigma = 0 is first order (returns D).
    Deterministic: ``noise`` is accepted (one signature for all samplers) and not used.
    """
    check(order in (1, 2, 3), f"order must be 1, 2 or 3, got {order!r}")
    check(variant in ("bh1", "bh2"), f"variant must be 'bh1' or 'bh2', got {variant!r}")
    sigmas = check_inputs(x, sigmas)
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "unipc")
    evaluate = evaluator(denoiser, x, cond, run)
    sig = sigmas.tolist()
    n = len(sig) - 1
    orders, pred, corr = _plan(tuple(sig), order, variant, corrector, lower_order_final)
    ratio = [sig[i + 1] / sig[i] for i in range(n)]
    hist: list[torch.Tensor] = []  # D_i, D_{i-1}, ... newest first
    x_last: torch.Tensor | None = None
    p_last = 0
    for i in run.steps(progress, "unipc"):
        sigma, sigma_next = sig[i], sig[i + 1]
        D = evaluate(x, sigma)
        if corrector and x_last is not None:  # UniC-p_last: redo step i-1 -> i with D_i
            x = _step(x_last, ratio[i - 1], corr[i - 1], hist, p_last, D_next=D)
        report(callback, x, i, sigmas, sigma, D)
        hist = ([D] + hist)[:order]
        p = orders[i]
        if sigma_next == 0:
            x = D
            break
        x_last, p_last = x, p
        x = _step(x, ratio[i], pred[i], hist, p)
    return x
