"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598).

``D = D_u + w (D_c - D_u)``. Paper convention ``eps = (1 + w') eps_c - w' eps_u``: ``w = 1 + w'``.
diffusers' ``guidance_scale`` is ``w`` itself.
"""

from __future__ import annotations

from ._base import DROP, Branch, Guided


def cfg(denoiser, w, *, uncond=None, key: str = "label", null=None) -> Guided:
    """Classifier-free guidance of ``denoiser`` at weight ``w`` (``w = 1``: no guidance).

    * same network (``uncond=None``): the reference branch replaces ``cond[key]`` by ``null``
      (default: ``denoiser.null_label``); both branches run in **one batched call**;
    * separate unconditional network ``uncond``: it is called without ``key`` (the EDM2 setting).
    """
    if uncond is None:
        if null is None:
            null = getattr(denoiser, "null_label", None)
        if null is None:
            raise ValueError("cfg with one network needs the null condition: pass null=... or uncond=<network>")
        ref = Branch(denoiser, {key: null})
    else:
        ref = Branch(uncond, {key: DROP if null is None else null})
    return Guided(Branch(denoiser), ref, w, "cfg")
