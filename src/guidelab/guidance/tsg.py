"""Time-step guidance; the method's documentation is :func:`tsg`'s docstring."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..denoisers import bcast
from ..errors import GuidelabError, check
from ._base import Branch, Guided, PerCall, draw_normal, draw_seeds
from .icg import _seed_list
from .protocols import Run
from .weight_schedule import Weight

KEY = "noise_embed_offset"
_SALT = 0x75C
FORMS = ("vector", "scalar")


def tsg(
    denoiser: Callable[..., torch.Tensor],
    w: Weight,
    *,
    s: float = 0.5,
    alpha: float = 0.0,
    form: str | None = None,
    dim: int | None = None,
    key: str = KEY,
    seeds: Sequence[int] | torch.Tensor | None = None,
    hook: bool = True,
) -> Guided:
    """Time-step guidance, TSG (Sadat et al., "No Training, No Problem", ICLR 2025, arXiv 2407.02687) of
    ``denoiser`` at weight ``w``: one batched call of both branches.

    The reference branch is the same network whose noise-level embedding is perturbed::

        t_hat = t + s t^alpha n,  n ~ N(0, I)
        D = D(x; t_hat) + w (D(x; t) - D(x; t_hat))          (w = 1: no guidance, paper convention)

    Works for unconditional models (no condition needed). Our denoisers take sigma, and sigma also sets
    the EDM preconditioning (c_skip, c_out, c_in); the perturbation must reach *only* the noise embedding.
    Hook: networks accept a conditioning key ``noise_embed_offset`` ([batch] or [batch, dim]) that they add
    to their noise-embedding input (EDM's ``c_noise = ln(sigma) / 4``) or embedding vector. Here
    ``t = sigma^2 / (1 + sigma^2)`` (the VP noise fraction 1 - alpha_bar, in [0, 1) like the paper's
    normalised time), so ``offset = s t^alpha n``. The main branch gets a zero offset.

    ``form="vector"`` (default): ``n`` in R^dim perturbs the embedding *vector*, as the paper does, a
    direction off the embeddings the network was trained on, so the reference is a degraded prediction
    and guiding away from it sharpens, like autoguidance. ``dim`` defaults to the denoiser's declared
    ``noise_embed_dim`` (ToyMLP: ``hidden``; PixelMLP / UNet: ``emb``); a denoiser that declares none is
    an error (ask for ``form="scalar"`` explicitly). ``form="scalar"`` perturbs the scalar ``c_noise``,
    which only moves the reference to another *valid* noise level; on the exact tree world it does not
    help (docs/GUIDANCE.md). Defaults ``alpha = 0`` (and the vector form) are what the project's sweep
    found to help (bench/tsg_sweep.py: ``s = 0.2-0.5``, ``alpha = 0``, ``w = 2-3``).

    ``hook=False`` (black-box denoisers; scalar form only, its default): the reference branch is called at
    ``sigma_hat = sigma * exp(4 offset)`` (the sigma whose c_noise is c_noise + offset). That also moves
    the preconditioning, so it is an approximation of TSG, not the paper's method.

    Randomness as :func:`~guidelab.guidance.icg`: ``seeds``, else the run's per-sample seeds, else
    torch's global generator.
    """
    form = form if form is not None else "vector" if hook else "scalar"
    check(form in FORMS, f"tsg form must be 'vector' or 'scalar', got {form!r}")
    check(
        hook or (form == "scalar" and dim is None),
        "tsg's black-box fallback (hook=False) perturbs sigma, a scalar: form must be 'scalar' and dim None",
    )
    if form == "vector":
        dim = dim if dim is not None else getattr(denoiser, "noise_embed_dim", None)
        check(
            dim is not None,
            f"tsg's vector form needs the size of the noise embedding: {type(denoiser).__name__} "
            "declares no noise_embed_dim; pass dim=... or form='scalar'",
        )
        if not (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1):
            raise GuidelabError(f"tsg dim must be an integer >= 1, got {dim!r}")
        shape: tuple[int, ...] = (dim,)
    else:
        check(dim is None, f"tsg's scalar form perturbs c_noise: dim must be None, got {dim!r}")
        shape = ()
    seeds = _seed_list(seeds)

    def offset(_: Any, x: torch.Tensor, sigma: torch.Tensor, run: Run | None) -> torch.Tensor:
        t = sigma**2 / (1 + sigma**2)
        n = draw_normal(draw_seeds(seeds, run), sigma, shape, _SALT, x)
        return bcast(s * t.to(n.dtype) ** alpha, n) * n  # s t^alpha n

    def zero(_: Any, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((x.shape[0],) + shape)

    net = denoiser
    if not hook:

        def net(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:  # black-box fallback
            off = cond.pop(key)
            return denoiser(x, sigma * torch.exp(4 * off.reshape(sigma.shape)), **cond)

    return Guided(Branch(net, {key: PerCall(zero)}), Branch(net, {key: PerCall(offset, with_run=True)}), w, "tsg")
