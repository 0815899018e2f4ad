"""Autoguidance; the method's documentation is :func:`autoguidance`'s docstring."""

from __future__ import annotations

from typing import Callable

import torch

from ._base import Branch, Guided
from .weight_schedule import Weight


def autoguidance(denoiser: Callable[..., torch.Tensor], guide: Callable[..., torch.Tensor], w: Weight) -> Guided:
    """Autoguidance (Karras et al. 2024, arXiv 2406.02507): guide ``denoiser`` with a bad version of itself.

    ``D = D_0 + w (D_1 - D_0)``, ``D_1 = denoiser`` the main model, ``D_0 = guide`` a smaller and/or
    less-trained model with the *same* conditioning (both see the same ``cond``). Same convention as
    the paper and EDM2 (``w = 1``: no guidance).

    The guide can be any weaker denoiser: a smaller network trained shorter (EDM2 presets), or an
    earlier snapshot / a shorter post-hoc EMA of the *same* training run, e.g. with ToyMLP::

        main, guide = load(run / "final.safetensors"), load(run / "snapshot-000512.safetensors")
        D = autoguidance(main, guide, 2.0)          # tests/guidance/test_trained_guides.py

    Cost: one evaluation of each network per call (two different networks cannot share a batch).
    """
    return Guided(Branch(denoiser), Branch(guide), w, "autoguidance")
