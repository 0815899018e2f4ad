"""Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel.

``k(x, y) = (x . y / D + 1)^3``; the estimate is averaged over random subsets of both sets (the
protocol of the paper and of clean-fid / torch-fidelity), which bounds the cost at O(subset^2).
"""

from __future__ import annotations

import math

import torch

from ..errors import check


def _mmd2_poly(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 (Bińkowski et al. 2018, Eq. 4 of Gretton et al. 2012) between two [m, D] sets."""
    m, D = x.shape
    kxx = (x @ x.T / D + 1) ** 3
    kyy = (y @ y.T / D + 1) ** 3
    kxy = (x @ y.T / D + 1) ** 3
    off = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))  # noqa: E731 -- diagonal terms dropped
    return off(kxx) + off(kyy) - 2 * kxy.mean()


def kid(
    real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID between features ``real`` [N, D] and ``fake`` [M, D]: (mean, std) over ``subsets`` subsets.

    ``subset_size`` is capped at min(N, M); subsets are drawn without replacement from a generator
    seeded by ``seed`` (deterministic). With one subset covering both sets it is the full unbiased MMD^2.
    """
    for name, t in (("real", real), ("fake", fake)):
        check(
            isinstance(t, torch.Tensor) and t.ndim == 2 and t.shape[0] >= 2,
            f"{name} must be a tensor of shape [N, D] with N >= 2, got {list(getattr(t, 'shape', []))}",
        )
    check(real.shape[1] == fake.shape[1], f"real and fake dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    check(isinstance(subsets, int) and subsets >= 1, f"subsets must be an integer >= 1, got {subsets!r}")
    m = min(subset_size, real.shape[0], fake.shape[0])
    check(m >= 2, f"subset_size must be >= 2, got {subset_size!r}")
    real, fake = real.double(), fake.double()
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        i = torch.randperm(real.shape[0], generator=g)[:m]
        j = torch.randperm(fake.shape[0], generator=g)[:m]
        vals.append(_mmd2_poly(real[i], fake[j]).item())
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return mean, std
