"""Adaptive projected guidance; the method's documentation is :func:`apg`'s docstring."""

from __future__ import annotations

import torch

from ..denoisers import bcast
from ..errors import GuidelabError, check
from ._base import Guided, batch_dot
from .protocols import Run


class APGMomentum:
    """The momentum buffer of one sampling run: ``m_i = dD_i + beta m_{i-1}`` over the run's steps ``i``.

    The first evaluation of step ``i`` sets ``m_i``; later evaluations of the same step (Heun's second,
    a midpoint) get ``dD + beta m_{i-1}`` and leave the buffer alone. A step the guider is not evaluated
    in (outside a guidance interval) does not count.
    """

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.step: int | None = None
        self.prev: torch.Tensor | None = None  # m of the last step before the current one
        self.cur: torch.Tensor | None = None  # m of the current step

    def __call__(self, dD: torch.Tensor, step: int) -> torch.Tensor:
        first = step != self.step
        if first:
            check(self.step is None or step > self.step, f"APG momentum: step {step} after step {self.step}")
            self.prev, self.step = self.cur, step
        check(
            self.prev is None or self.prev.shape == dD.shape,
            f"APG momentum: the batch changed within a run ({list(self.prev.shape) if self.prev is not None else []} "
            f"-> {list(dD.shape)}); a sampler evaluates the whole batch at one sigma",
        )
        m = dD if self.prev is None else dD + self.beta * self.prev
        if first:
            self.cur = m
        return m


class _APGRule:
    def __init__(self, eta: float, r: float | None, beta: float) -> None:
        self.eta, self.r, self.beta = eta, r, beta

    def __call__(
        self, D_c: torch.Tensor, D_u: torch.Tensor, w: float | torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, run: Run | None
    ) -> torch.Tensor:
        dD = D_c - D_u
        if self.beta != 0:
            if run is None:
                raise GuidelabError(
                    "apg with momentum (beta != 0) keeps per-run state: call it through a sampler, "
                    "or bind it to a run with .start(guidance.Run(x, sigmas)) and step through run.steps()"
                )
            dD = run.state(self, lambda: APGMomentum(self.beta))(dD, run.step)
        if self.r:
            norm = dD.flatten(1).norm(dim=1)
            dD = dD * bcast((self.r / norm.clamp_min(1e-30)).clamp_max(1.0), dD)
        d64, c64 = dD.double(), D_c.double()
        par = bcast(batch_dot(d64, c64) / batch_dot(c64, c64).clamp_min(1e-300), c64) * c64
        update = (d64 - par) + self.eta * par
        return D_c + (w - 1) * update.to(D_c.dtype)


def apg(guider: Guided, *, eta: float = 0.0, r: float | None = None, beta: float = 0.0) -> Guided:
    """Adaptive projected guidance, APG (Sadat, Hilliges, Weber, ICLR 2025, arXiv 2410.02416, Algorithm 1)
    of ``guider`` (cfg, autoguidance, icg, tsg); same branches and cost.

    In x0 (denoised) space, per sample (inner products over all non-batch dims)::

        dD  = D_c - D_u
        m   = dD + beta m ;  dD = m                    (reverse momentum, beta < 0; m = 0 at the run start)
        dD  = dD min(1, r / ||dD||)                    (norm threshold r; r = None/0: off)
        dD_par = <dD, D_c> / ||D_c||^2 D_c ;  dD_perp = dD - dD_par      (in float64)
        D   = D_c + (w - 1) (dD_perp + eta dD_par)

    Same ``w`` as the paper (``w = 1``: no guidance); ``eta = 1, r = None, beta = 0`` is exactly CFG.
    Recommended (methods.md §6): ``eta = 0``, ``r`` 2.5-15, ``beta`` -0.5 to -0.75 (model dependent).

    State: the momentum buffer ``m`` (:class:`APGMomentum`) lives in the sampler run
    (:class:`~guidelab.guidance.Run`): created when the run starts, advanced once per step by the step's
    first evaluation (Heun's second evaluation, a midpoint or a corrector use the step's ``m`` without
    advancing it), gone when the run ends. With ``beta != 0`` a call outside a sampler run is an error.
    """
    check(r is None or r >= 0, f"APG norm threshold r must be None or >= 0, got {r}")
    check(beta < 1, f"APG momentum beta must be < 1 (the paper uses negative values), got {beta}")
    return guider.with_rule(_APGRule(eta, r, beta), f"apg[{guider.name}]")
