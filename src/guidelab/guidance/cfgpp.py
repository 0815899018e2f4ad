"""CFG++; the method's documentation is :func:`cfgpp`'s docstring."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import check
from ._base import Guided
from .cfg import cfg


class CFGpp(Guided):
    """A CFG guider that requires the renoise step: :meth:`pair` is ``(D_lam, D_u)``."""

    requires = frozenset({"renoise"})

    def pair(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        D_c, D_u = self.branches(x, sigma, cond)
        return D_u.lerp(D_c, self.w), D_u


def cfgpp(
    denoiser: Callable[..., torch.Tensor],
    lam: float,
    *,
    uncond: Callable[..., torch.Tensor] | None = None,
    key: str | None = None,
    null: Any = None,
) -> CFGpp:
    """CFG++ (Chung et al., ICLR 2025, arXiv 2406.08070; CFGpp-diffusion/CFGpp) at the paper's ``lam``.

    The data term of each step uses ``D_lam = D_u + lam (D_c - D_u)``, the renoise (direction) term the
    *unconditional* ``D_u``; CFG renoises with ``D_lam`` too. Euler / DDIM in EDM form (paper eq. for
    DDIM, ``eps_u = (x - D_u) / sigma``)::

        x_next = D_lam + sigma_next (x - D_u) / sigma

    Mechanism: the guider requires the sampler feature ``"renoise"`` and hands ``(D_lam, D_u)`` through
    :meth:`CFGpp.pair`; samplers that support it (``samplers.info(name).supports``: euler,
    euler_ancestral, ddim, ddpm, dpmpp_2m, dpmpp_2s_ancestral, heun) take their direction / history terms
    from ``D_u``; every other sampler refuses it. Heun is guidelab's derivation, not a published form:
    CFG Heun at the step's CFG++ weight ``w = lam sigma / (sigma - sigma_next)`` (below), so its first stage
    is the CFG++ Euler step and it is second order where CFG++ Euler is CFG Euler
    (:func:`guidelab.samplers.base.heun_step`).
    Called as a plain denoiser it returns ``D_lam``. Rules that rewrite the guided output (rescale, apg,
    cfg_zero_star) and ``compose`` refuse it.

    Weight: ``lam`` in [0, 1] (``lam = 0``: unconditional; there is no "no guidance" value in our w
    convention). One Euler/DDIM step equals a CFG step of ``w_EDM = lam sigma / (sigma - sigma_next)``
    (methods.md §4, derived), so ``lam`` must shrink as steps get smaller. README: ``lam`` in [0, 1]
    behaves like CFG ``w`` in [1, 12.5]; examples use 0.6. Branches as in :func:`cfg` (one batched call).
    """
    check(isinstance(lam, (int, float)) and 0 <= lam <= 1, f"CFG++ lam must be a number in [0, 1], got {lam!r}")
    g = cfg(denoiser, float(lam), uncond=uncond, key=key, null=null)
    return CFGpp(g.main, g.ref, float(lam), "cfgpp")
