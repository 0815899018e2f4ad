"""Epsilon scaling (Ning et al., "Elucidating the Exposure Bias in Diffusion Models", ICLR 2024,
arXiv 2308.15321; forever208/EDM-ES, ADM-ES).

Exposure bias: at sampling time the network's noise prediction is too large in norm. Epsilon scaling
divides it by ``lambda(t) >= 1`` at every evaluation; in EDM form (as EDM-ES does)::

    eps = (x - D) / sigma ;  eps' = eps / lambda ;  D' = x - sigma eps' = x - (x - D) / lambda

``lambda`` is a number (EDM-ES's uniform schedule ``lambda(t) = b``) or a function of sigma
(ADM-ES's linear ``lambda(t) = k t + b``). EDM-ES values (CIFAR-10): b = 1.0006 for the 35-NFE Heun
sampler (conditional VP model), 1.0048 for 13-step Euler (unconditional VP); ComfyUI's default 1.005.
``lambda = 1`` is no correction (bit-identical).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..denoisers import bcast
from ..errors import check


class EpsilonScaled:
    """``D' = x - (x - D) / lambda(sigma)`` around any denoiser (or guider)."""

    def __init__(self, denoiser, lam):
        if not callable(lam):
            check(isinstance(lam, (int, float)) and lam > 0, f"epsilon scaling lambda must be a number > 0 or a function of sigma, got {lam!r}")
        self.denoiser, self.lam = denoiser, lam
        inner = getattr(denoiser, "unguided", None)
        if inner is not None:
            self.unguided = lambda x, sigma, **cond: self._scale(inner(x, sigma, **cond), x, sigma)
        self.name = f"epsilon_scaling[{getattr(denoiser, 'name', type(denoiser).__name__)}]"

    def _scale(self, D: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        lam = self.lam(sigma) if callable(self.lam) else self.lam
        if not isinstance(lam, torch.Tensor) and lam == 1:
            return D
        lam = bcast(torch.as_tensor(lam, dtype=D.dtype, device=D.device).expand(sigma.shape), D) if isinstance(lam, torch.Tensor) else lam
        return x - (x - D) / lam

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self._scale(self.denoiser(x, sigma, **cond), x, sigma)

    def denoise_pair(self, x: torch.Tensor, sigma: torch.Tensor, **cond):
        inner = getattr(self.denoiser, "denoise_pair", None)
        if inner is None:
            D = self(x, sigma, **cond)
            return D, D
        D, D_r = inner(x, sigma, **cond)
        return self._scale(D, x, sigma), self._scale(D_r, x, sigma)


def epsilon_scaling(denoiser, lam: float | Callable[[torch.Tensor], torch.Tensor]) -> EpsilonScaled:
    """Scale ``denoiser``'s noise prediction by ``1 / lam`` (a number or ``lam(sigma) -> [batch]``)."""
    return EpsilonScaled(denoiser, lam)
