"""Autoguidance (Karras et al. 2024, arXiv 2406.02507): guide a model with a bad version of itself.

``D = D_0 + w (D_1 - D_0)``, ``D_1`` the main model, ``D_0`` a smaller and/or less-trained guide
with the *same* conditioning. Same convention as the paper and EDM2 (``w = 1``: no guidance).
"""

from __future__ import annotations

from ._base import Branch, Guided


def autoguidance(denoiser, guide, w) -> Guided:
    """Guide ``denoiser`` with the weaker ``guide`` at weight ``w``; both see the same ``cond``."""
    return Guided(Branch(denoiser), Branch(guide), w, "autoguidance")
