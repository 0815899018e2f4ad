"""Conversions between the denoiser output D and the spaces non-linear guiders work in.

For a fixed (x, sigma) each is affine in D (methods.md §0), so a linear guider is the same in every
space; rescale, CFG-Zero* and APG are not, and state the space they use.

* ``x0``:   D itself.
* ``eps``:  ``eps = (x - D) / sigma``.
* ``v``:    VP v-prediction (sigma_data = 1): ``z = x / sqrt(1 + s^2)``, ``v = (x / (1 + s^2) - D) sqrt(1 + s^2) / s``.
* ``flow``: rectified-flow velocity ``v = eps - x0`` for ``x_t = (1 - t) x0 + t eps`` with
  ``t = s / (1 + s)``, ``x_t = x / (1 + s)``:  ``v = (x - D) / s - D``.
"""

from __future__ import annotations

import torch

from ..denoisers import bcast
from ..errors import check

SPACES = ("x0", "eps", "v", "flow")


def check_space(space: str) -> None:
    check(space in SPACES, f"unknown guidance space {space!r}; allowed: {', '.join(SPACES)}")


def to_space(D: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, space: str) -> torch.Tensor:
    s = bcast(sigma, x).to(D.dtype)
    if space == "x0":
        return D
    if space == "eps":
        return (x - D) / s
    if space == "v":
        r = (1 + s**2).sqrt()
        return (x / r**2 - D) * r / s
    return (x - D) / s - D


def from_space(y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, space: str) -> torch.Tensor:
    s = bcast(sigma, x).to(y.dtype)
    if space == "x0":
        return y
    if space == "eps":
        return x - s * y
    if space == "v":
        r = (1 + s**2).sqrt()
        return x / r**2 - s / r * y
    return (x - s * y) / (1 + s)
