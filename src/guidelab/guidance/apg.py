"""Adaptive projected guidance, APG (Sadat, Hilliges, Weber, ICLR 2025, arXiv 2410.02416, Algorithm 1).

In x0 (denoised) space, per sample (inner products over all non-batch dims)::

    dD  = D_c - D_u
    m   = dD + beta m ;  dD = m                    (reverse momentum, beta < 0; m = 0 at the run start)
    dD  = dD min(1, r / ||dD||)                    (norm threshold r; r = None/0: off)
    dD_par = <dD, D_c> / ||D_c||^2 D_c ;  dD_perp = dD - dD_par      (in float64)
    D   = D_c + (w - 1) (dD_perp + eta dD_par)

Same ``w`` as the paper (``w = 1``: no guidance); ``eta = 1, r = None, beta = 0`` is exactly CFG.
Recommended (methods.md §6): ``eta = 0``, ``r`` 2.5-15, ``beta`` -0.5 to -0.75 (model dependent).

State: the momentum buffer ``m`` is the only state, held by an :class:`APGMomentum` owned by the guider.
It is reset when a run starts: when any sample's sigma increases over the previous call's, or the
batch shape changes (and by ``reset()``). It is updated at every evaluation (both Heun stages).
"""

from __future__ import annotations

import torch

from ..denoisers import bcast
from ..errors import check
from ._base import Guided, batch_dot


class APGMomentum:
    """The running average ``m = dD + beta m`` of one sampling run."""

    def __init__(self, beta: float):
        self.beta = beta
        self.reset()

    def reset(self) -> None:
        self.m: torch.Tensor | None = None
        self.last_sigma: torch.Tensor | None = None

    def __call__(self, dD: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        new_run = (self.m is None or self.m.shape != dD.shape or self.last_sigma is None
                   or bool((sigma > self.last_sigma).any()))
        self.m = dD if new_run else dD + self.beta * self.m
        self.last_sigma = sigma.detach().clone()
        return self.m


class _APGRule:
    def __init__(self, eta: float, r: float | None, beta: float):
        self.eta, self.r = eta, r
        self.momentum = APGMomentum(beta) if beta != 0 else None

    def __call__(self, D_c, D_u, w, x, sigma):
        dD = D_c - D_u
        if self.momentum is not None:
            dD = self.momentum(dD, sigma)
        if self.r:
            norm = dD.flatten(1).norm(dim=1)
            dD = dD * bcast((self.r / norm.clamp_min(1e-30)).clamp_max(1.0), dD)
        d64, c64 = dD.double(), D_c.double()
        par = bcast(batch_dot(d64, c64) / batch_dot(c64, c64).clamp_min(1e-300), c64) * c64
        update = (d64 - par) + self.eta * par
        return D_c + (w - 1) * update.to(D_c.dtype)


def apg(guider: Guided, *, eta: float = 0.0, r: float | None = None, beta: float = 0.0) -> Guided:
    """``guider`` (cfg, autoguidance, icg, tsg) combined by APG; same branches and cost.

    ``guider.rule.momentum.reset()`` resets the momentum by hand (it also resets itself per run).
    """
    check(r is None or r >= 0, f"APG norm threshold r must be None or >= 0, got {r}")
    check(beta < 1, f"APG momentum beta must be < 1 (the paper uses negative values), got {beta}")
    return guider.with_rule(_APGRule(eta, r, beta), f"apg[{guider.name}]")
