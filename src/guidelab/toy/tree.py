"""The two-class fractal "tree" of the autoguidance paper's toy example (Karras et al. 2024, Sec. 3).

Built exactly as ``NVlabs/edm2``'s ``toy_example.py`` builds it (methods.md §2.3): same constants,
same order of random draws from ``np.random.RandomState(2)``, so it is the paper's distribution.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..errors import check
from .mixture import GaussianMixture

ORIGIN = np.array([0.0030, 0.0325])
SCALE = np.array([1.3136, 1.3844])
SIGMA_DATA = 0.5
DEPTH = 7


@functools.lru_cache(None)
def _components(seed: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All components of both classes: (classes [K] str, phi [K], mu [K, 2], Sigma [K, 2, 2])."""
    rnd = np.random.RandomState(seed)
    cls, phi, mu, Sigma = [], [], [], []

    def branch(c: str, depth: int, pos: np.ndarray, angle: float) -> None:
        if depth >= DEPTH:
            return
        direction = np.array([np.cos(angle), np.sin(angle)])
        length = 0.292 * 0.8**depth * (1 + 0.2 * rnd.randn())
        thick = 0.2 * 0.8**depth / length
        size = SCALE * length * 0.06
        along = np.outer(direction, direction)
        cov = (along + (np.eye(2) - along) * thick**2) * np.outer(size, size)
        for t in np.linspace(0.07, 0.93, num=8):
            cls.append(c)
            phi.append(length * 0.5**depth)
            mu.append((pos + direction * length * t) * SCALE)
            Sigma.append(cov)
        for sign in (1, -1):
            # The child's angle is drawn before recursing, even when the child is a leaf.
            branch(c, depth + 1, pos + direction * length, angle + sign * 0.7**depth * (1 + 0.2 * rnd.randn()))

    branch("A", 0, ORIGIN, np.pi * 0.25)
    branch("B", 0, ORIGIN, np.pi * 1.25)
    return np.array(cls), np.array(phi), np.array(mu), np.array(Sigma)


@functools.lru_cache(None)
def _tree(classes: str, dtype: torch.dtype) -> GaussianMixture:
    cls, phi, mu, Sigma = _components()
    sel = np.isin(cls, list(classes))
    return GaussianMixture(phi[sel], mu[sel], Sigma[sel], dtype=dtype)


def tree(classes: str = "A", *, dtype: torch.dtype = torch.float32) -> GaussianMixture:
    """The fractal tree restricted to ``classes``: "A" (1016 components), "B" or "AB" (2032)."""
    check(classes in ("A", "B", "AB"), f"unknown tree classes {classes!r}; allowed: 'A', 'B', 'AB'")
    return _tree(classes, dtype)
