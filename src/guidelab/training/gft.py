"""Guidance-free training, GFT (Chen et al. 2025, arXiv 2501.15420; methods.md §8).

One network ``D_theta(x; sigma, c, beta)`` with an extra scalar ``beta`` in ``(0, 1]`` (the "sampling
model"). Its unconditional branch is the same network at ``(c = null, beta = 1)``, frozen:
``D_u = stopgrad(D_theta(x; sigma, null, 1))`` (eval mode, no grad). The paper's loss (eps space,
DiT ``training_losses``) is

    L_eps = || beta eps_theta(x, c, beta) + (1 - beta) eps_u - eps ||^2,   beta ~ U[0, 1] per sample.

Mapping to guidelab's x0 space: ``eps = (x - D) / sigma`` is affine in ``D`` for fixed ``(x, sigma)``
and the interpolation weights sum to 1, so
``beta eps_theta + (1 - beta) eps_u - eps = -(beta D_theta + (1 - beta) D_u - x0) / sigma``:

    L_D = lambda(sigma) || beta D_theta(x; sigma, c, beta) + (1 - beta) D_u - x0 ||^2

is the same objective up to the per-sigma weight (EDM's ``lambda(sigma) = 1 / c_out^2`` instead of
``1 / sigma^2``), hence the same minimiser. At the optimum ``beta D_theta + (1 - beta) D_u = D_c``,
i.e. ``D_theta(.., beta) = D_u + (1 / beta)(D_c - D_u)``: CFG with ``w = 1 / beta``.

Label dropout is kept as in the paper: a dropped sample sees ``(null, beta = 1)``, so its interpolated
output equals ``D_u`` numerically and its term is the ordinary unconditional loss (its gradient still
scaled by the sampled ``beta``, as in the paper's code).

Sampling (:func:`gft_denoiser`): the network at ``beta = 1 / w``, one evaluation per step; ``w = 1`` is
the plain conditional network.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..denoisers import Denoiser, EDMPrecond, bcast
from ..errors import check

SCALAR = "beta"  # the keyword of the extra scalar input of a GFT network


def gft_loss(
    net: nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    target: torch.Tensor,
    precond: EDMPrecond,
    *,
    beta: torch.Tensor,
    label: torch.Tensor,
    null_label: int,
) -> torch.Tensor:
    """Per-sample GFT loss ``lambda(sigma) mean ||beta D_theta + (1 - beta) D_u - target||^2`` [batch].

    ``x`` [batch, ...] noisy input, ``sigma``/``beta``/``label`` [batch]; ``target`` is ``x0`` (or the
    exact ``E[x0 | x; c]`` in an exact world). Samples with ``label == null_label`` are fed ``beta = 1``
    (label dropout), the loss still interpolates with the sampled ``beta`` (methods.md §8).
    At ``beta = 1`` this is :func:`guidelab.denoisers.edm_loss` exactly.
    """
    check(x.shape == target.shape, f"x {list(x.shape)} and target {list(target.shape)} must have the same shape")
    for name, v in (("sigma", sigma), ("beta", beta), ("label", label)):
        check(v.shape == x.shape[:1], f"{name} must have shape [batch]=[{x.shape[0]}], got {list(v.shape)}")
    beta_in = torch.where(label == null_label, torch.ones_like(beta), beta)
    was_training = net.training
    net.eval()
    with torch.no_grad():  # D_u = stopgrad(D(x; sigma, null, beta=1)), eval mode (paper's code)
        D_u = net(x, sigma, label=torch.full_like(label, null_label), **{SCALAR: torch.ones_like(beta)})
    net.train(was_training)
    D = net(x, sigma, label=label, **{SCALAR: beta_in})
    D_s = D_u.lerp(D, bcast(beta, x).to(D.dtype))  # beta D_theta + (1 - beta) D_u  (GFT loss, eps -> D space)
    err = (D_s - target) ** 2
    return precond.loss_weight(sigma) * err.flatten(1).mean(1)


def gft_denoiser(net: Callable[..., torch.Tensor], w: float) -> Denoiser:
    """The GFT sampling denoiser at guidance weight ``w >= 1``: ``net(x, sigma, **cond, beta=1/w)``.

    One network evaluation per call; ``w = 1`` is ``net`` at ``beta = 1`` (the conditional model),
    bit-identical. ``w < 1`` would need ``beta > 1``, outside the trained range ``(0, 1]``.
    """
    check(
        isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 1,
        f"GFT guidance weight w must be a number >= 1 (beta = 1/w in (0, 1]), got {w!r}",
    )
    check(
        getattr(net, "extra_scalar", SCALAR) == SCALAR,
        f"gft_denoiser needs a network with the extra scalar {SCALAR!r}, got {getattr(net, 'extra_scalar', None)!r}",
    )
    beta = 1.0 / float(w)

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        check(SCALAR not in cond, f"gft_denoiser sets {SCALAR} itself (= 1/w); do not pass it in cond")
        return net(x, sigma, **cond, **{SCALAR: beta})

    return denoiser


def draw_beta(batch: int, gen: torch.Generator, device: str | torch.device | None = None) -> torch.Tensor:
    """``beta ~ U[0, 1]`` per sample (the paper's ``min_beta = 0, max_beta = 1``) [batch]."""
    return torch.rand(batch, generator=gen, device=device)
