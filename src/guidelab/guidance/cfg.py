"""Classifier-free guidance; the method's documentation is :func:`cfg`'s docstring."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import GuidelabError
from ._base import DROP, Branch, Guided
from .weight_schedule import Weight


def cfg(
    denoiser: Callable[..., torch.Tensor],
    w: Weight,
    *,
    uncond: Callable[..., torch.Tensor] | None = None,
    key: str | None = None,
    null: Any = None,
) -> Guided:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) of ``denoiser`` at weight ``w``.

    ``D = D_u + w (D_c - D_u)`` (``w = 1``: no guidance). Paper convention
    ``eps = (1 + w') eps_c - w' eps_u``: ``w = 1 + w'``; diffusers' ``guidance_scale`` is ``w`` itself.

    * same network (``uncond=None``): the reference branch applies ``denoiser.condition.null`` (the
      overrides its :class:`~guidelab.guidance.Condition` declares), or ``{key: null}`` when ``null`` is
      given; both branches run in **one batched call**;
    * separate unconditional network ``uncond``: it is called without ``key`` (the EDM2 setting), or with
      ``key = null`` when given.

    ``key`` defaults to the declared ``condition.key`` (else ``"label"``).
    """
    condition = getattr(denoiser, "condition", None)
    key = key if key is not None else condition.key if condition is not None else "label"
    if uncond is not None:
        ref = Branch(uncond, {key: DROP if null is None else null})
    elif null is not None:
        ref = Branch(denoiser, {key: null})
    else:
        if condition is None or not condition.null:
            raise GuidelabError(
                f"cfg with one network needs its null condition: {type(denoiser).__name__} declares "
                "no condition; pass null=... or uncond=<network>"
            )
        ref = Branch(denoiser, dict(condition.null))
    return Guided(Branch(denoiser), ref, w, "cfg")
