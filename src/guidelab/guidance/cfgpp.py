"""CFG++ (Chung et al., ICLR 2025, arXiv 2406.08070; CFGpp-diffusion/CFGpp).

The data term of each step uses ``D_lam = D_u + lam (D_c - D_u)``, the renoise (direction) term uses
the *unconditional* ``D_u``; CFG renoises with ``D_lam`` too. Euler / DDIM in EDM form (paper eq. for
DDIM, ``eps_u = (x - D_u) / sigma``)::

    x_next = D_lam + sigma_next (x - D_u) / sigma

Mechanism: the guider returns ``(D_data, D_renoise) = (D_lam, D_u)`` from :meth:`CFGpp.denoise_pair`;
samplers that support it (``samplers.base.denoise_pair``) take their direction/history terms from
``D_renoise`` and their data term from ``D_data``. Called as a plain denoiser it returns ``D_lam``.

Weight: the paper's ``lam`` in [0, 1] (``lam = 0``: unconditional; there is no "no guidance" value in
our w convention). One Euler/DDIM step equals a CFG step of ``w_EDM = lam sigma / (sigma - sigma_next)``
(methods.md §4, derived), so ``lam`` must shrink as steps get smaller. README: ``lam`` in [0, 1]
behaves like CFG ``w`` in [1, 12.5]; examples use 0.6.
"""

from __future__ import annotations

import torch

from ..errors import check
from ._base import Guided
from .cfg import cfg


class CFGpp(Guided):
    """A CFG guider that hands samplers the unconditional renoise direction."""

    def denoise_pair(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        D_c, D_u = self.branches(x, sigma, cond)
        return D_u.lerp(D_c, self.w), D_u


def cfgpp(denoiser, lam: float, *, uncond=None, key: str = "label", null=None) -> CFGpp:
    """CFG++ at ``lam`` (paper's lambda, in [0, 1]); branches as in :func:`cfg` (one batched call)."""
    check(isinstance(lam, (int, float)) and 0 <= lam <= 1, f"CFG++ lam must be a number in [0, 1], got {lam!r}")
    g = cfg(denoiser, float(lam), uncond=uncond, key=key, null=null)
    return CFGpp(g.main, g.ref, float(lam), "cfgpp")
