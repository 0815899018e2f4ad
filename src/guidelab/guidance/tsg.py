"""Time-step guidance, TSG (Sadat et al., "No Training, No Problem", ICLR 2025, arXiv 2407.02687).

The reference branch is the same network whose noise-level embedding is perturbed::

    t_hat = t + s t^alpha n,  n ~ N(0, I)
    D = D(x; t_hat) + w (D(x; t) - D(x; t_hat))          (w = 1: no guidance, paper convention)

Works for unconditional models (no condition needed). Our denoisers take sigma, and sigma also sets
the EDM preconditioning (c_skip, c_out, c_in); the perturbation must reach *only* the noise embedding.
Hook: networks accept a conditioning key ``noise_embed_offset`` ([batch] or [batch, dim]) that they add
to their noise-embedding input (EDM's ``c_noise = ln(sigma) / 4``; guidelab.models.ToyMLP does).
Here ``t = sigma^2 / (1 + sigma^2)`` (the VP noise fraction 1 - alpha_bar, in [0, 1) like the paper's
normalised time), so ``offset = s t^alpha n`` in units of c_noise (or of the embedding vector's
coordinates). The main branch gets a zero offset,
so both branches run in one batched call.

Scalar or vector: ``dim=None`` perturbs the scalar ``c_noise``, which only moves the reference to
another *valid* noise level; with the paper's symmetric ``n`` half the draws are sharper, half blurrier,
and on the exact tree world this does not help (docs/GUIDANCE.md). The paper perturbs the time-embedding
*vector*: ``dim=D`` draws ``n`` in R^D, a direction off the set of embeddings the network was trained
on, so the reference is a degraded prediction and guiding away from it sharpens, like autoguidance.
For ToyMLP pass ``dim=net.hidden`` (its noise embedding is the first layer's image of ``c_noise``).
Measured on undertrained ToyMLPs: ``s = 0.2-0.5``, ``alpha = 0``, ``w = 2-3``.

Fallback for black-box denoisers (``hook=False``): the reference branch is called at
``sigma_hat = sigma * exp(4 offset)`` (the sigma whose c_noise is c_noise + offset). That also moves
the preconditioning, so it is an approximation of TSG, not the paper's method.
"""

from __future__ import annotations

import torch

from ..denoisers import bcast
from ..errors import check
from ._base import Branch, Guided, PerCall, draw_normal

KEY = "noise_embed_offset"
_SALT = 0x75C


def tsg(denoiser, w, *, s: float = 0.5, alpha: float = 1.0, dim: int | None = None, key: str = KEY,
        seeds=None, hook: bool = True) -> Guided:
    """TSG of ``denoiser`` at weight ``w``: one batched call of both branches.

    ``s``, ``alpha``: perturbation scale and time exponent (paper's symbols; values tuned per model).
    ``dim``: size of the offset if the network perturbs an embedding vector (default: a [batch] scalar
    added to c_noise). ``seeds``: per-sample seeds for batch-size invariant noise (see icg).
    """
    check(hook or dim is None, "tsg's black-box fallback (hook=False) perturbs sigma, a scalar: dim must be None")
    seeds = None if seeds is None else [int(v) for v in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
    shape = () if dim is None else (dim,)

    def offset(_, x, sigma):
        t = sigma ** 2 / (1 + sigma ** 2)
        n = draw_normal(seeds, sigma, shape, _SALT, x)
        return bcast(s * t.to(n.dtype) ** alpha, n) * n             # s t^alpha n

    def zero(_, x, sigma):
        return x.new_zeros((x.shape[0],) + shape)

    net = denoiser
    if not hook:
        def net(x, sigma, **cond):                                      # black-box fallback
            off = cond.pop(key)
            return denoiser(x, sigma * torch.exp(4 * off.reshape(sigma.shape)), **cond)
    return Guided(Branch(net, {key: PerCall(zero)}), Branch(net, {key: PerCall(offset)}), w, "tsg")
