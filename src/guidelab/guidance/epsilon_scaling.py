"""Epsilon scaling; the method's documentation is :func:`epsilon_scaling`'s docstring."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from ..denoisers import bcast
from ..errors import check
from .protocols import Guider, Run


class EpsilonScaled(Guider):
    """``D' = x - (x - D) / lambda(sigma)`` around any denoiser or guider; see :func:`epsilon_scaling`."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], lam: float | Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not callable(lam):
            check(
                isinstance(lam, (int, float)) and lam > 0,
                f"epsilon scaling lambda must be a number > 0 or a function of sigma, got {lam!r}",
            )
        check(callable(denoiser), f"epsilon_scaling needs a denoiser or guider, got {type(denoiser).__name__}")
        self.denoiser, self.lam = denoiser, lam
        inner = denoiser.name if isinstance(denoiser, Guider) else type(denoiser).__name__
        self.name = f"epsilon_scaling[{inner}]"
        self.requires = denoiser.requires if isinstance(denoiser, Guider) else frozenset()

    def _scale(self, D: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        lam = self.lam(sigma) if callable(self.lam) else self.lam
        if not isinstance(lam, torch.Tensor) and lam == 1:
            return D
        lam = (
            bcast(torch.as_tensor(lam, dtype=D.dtype, device=D.device).expand(sigma.shape), D)
            if isinstance(lam, torch.Tensor)
            else lam
        )
        return x - (x - D) / lam

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self._scale(self.denoiser(x, sigma, **cond), x, sigma)

    def unguided(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The scaled main branch of a guider; a plain denoiser is its own main branch."""
        inner = self.denoiser.unguided if isinstance(self.denoiser, Guider) else self.denoiser
        return self._scale(inner(x, sigma, **cond), x, sigma)

    def pair(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(self.denoiser, Guider):
            D = self(x, sigma, **cond)
            return D, D
        D, D_r = self.denoiser.pair(x, sigma, **cond)
        if D_r is D:
            D = D_r = self._scale(D, x, sigma)
            return D, D
        return self._scale(D, x, sigma), self._scale(D_r, x, sigma)

    def start(self, run: Run) -> "EpsilonScaled":
        if not isinstance(self.denoiser, Guider) or (bound := self.denoiser.start(run)) is self.denoiser:
            return self
        new = copy.copy(self)
        new.denoiser = bound
        return new


def epsilon_scaling(denoiser: Callable[..., torch.Tensor], lam: float | Callable[[torch.Tensor], torch.Tensor]) -> EpsilonScaled:
    """Epsilon scaling (Ning et al., "Elucidating the Exposure Bias in Diffusion Models", ICLR 2024,
    arXiv 2308.15321; forever208/EDM-ES, ADM-ES) of ``denoiser`` (a denoiser or any guider).

    Exposure bias: at sampling time the network's noise prediction is too large in norm. Epsilon scaling
    divides it by ``lambda(t) >= 1`` at every evaluation; in EDM form (as EDM-ES does)::

        eps = (x - D) / sigma ;  eps' = eps / lambda ;  D' = x - sigma eps' = x - (x - D) / lambda

    ``lam`` is a number (EDM-ES's uniform schedule ``lambda(t) = b``) or ``lam(sigma) -> [batch]``
    (ADM-ES's linear ``lambda(t) = k t + b``). EDM-ES values (CIFAR-10): b = 1.0006 for the 35-NFE Heun
    sampler (conditional VP model), 1.0048 for 13-step Euler (unconditional VP); ComfyUI's default 1.005.
    ``lam = 1`` is no correction (bit-identical). Around a guider it scales the guided output, its
    unguided branch and both terms of its renoise pair, and requires what the guider requires.
    """
    return EpsilonScaled(denoiser, lam)
