"""Model-guidance training (MG; Tang et al. 2025, "Diffusion Models without Classifier-free Guidance",
arXiv 2502.12154): train the conditional model to output the guided prediction directly.

The paper's target in epsilon form is ``eps' = eps + lambda sg(eps_theta(x_t, c) - eps_theta(x_t, null))``
(``sg``: stop-gradient; the model's *own* current conditional and unconditional predictions). In the
denoiser form used here (``D = x - sigma eps``) the same target reads::

    x0' = x0 + lambda sg(D_theta(x; sigma, c) - D_theta(x; sigma, null))

and the loss is the EDM loss against ``x0'``; rows whose label was dropped (the null label, trained as
usual for CFG) keep ``x0' = x0``. At the fixed point ``D_c = E[x0 | x, c] + lambda (D_c - D_u)``, i.e.
``D_c = D_u + W (E[x0 | x, c] - D_u)`` with ``W = 1 / (1 - lambda)``: CFG at weight ``W`` in guidelab's
convention. So the config key is that weight, ``mg_w = W`` (``>= 1``; ``lambda = 1 - 1 / W``); ``mg_w = 1``
is ``lambda = 0``, the plain EDM loss exactly. The two stop-gradient predictions are one batched call.
The trained network is sampled unguided (``--guider none``): its conditional output is the guided one.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..denoisers import EDMPrecond, edm_loss
from ..errors import check


def mg_lambda(w: float) -> float:
    """The paper's ``lambda`` for guidelab weight ``w``: ``1 - 1 / w`` (``w = 1``: 0)."""
    check(isinstance(w, (int, float)) and math.isfinite(w) and w >= 1, f"mg_w must be a number >= 1, got {w!r}")
    return 1.0 - 1.0 / float(w)


def mg_target(
    net: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    x0: torch.Tensor,
    label: torch.Tensor,
    null_label: int,
    *,
    w: float,
    key: str = "label",
) -> torch.Tensor:
    """``x0 + lambda sg(D(x, c) - D(x, null))`` [batch, ...]; ``x0`` on null-label rows and at ``w = 1``."""
    lam = mg_lambda(w)
    if lam == 0:
        return x0
    null = torch.full_like(label, int(null_label))
    with torch.no_grad():
        D_c, D_u = net(x.repeat((2,) + (1,) * (x.ndim - 1)), sigma.repeat(2), **{key: torch.cat([label, null])}).chunk(2)
    dropped = (label == null).reshape((-1,) + (1,) * (x.ndim - 1))
    return torch.where(dropped, x0, x0 + lam * (D_c - D_u))


def mg_loss(
    net: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    x0: torch.Tensor,
    precond: EDMPrecond,
    *,
    label: torch.Tensor,
    null_label: int,
    w: float,
    key: str = "label",
) -> torch.Tensor:
    """Per-sample MG loss [batch]: the EDM loss against :func:`mg_target` (``w = 1``: ``edm_loss`` exactly)."""
    target = mg_target(net, x, sigma, x0, label, null_label, w=w, key=key)
    return edm_loss(net, x, sigma, target, precond, **{key: label})
