"""Metrics on point clouds: k-NN precision/recall, sliced Wasserstein distance, MMD.

All take two [N, D] tensors (real/reference first, generated second) and return Python floats.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

from ..errors import check

if TYPE_CHECKING:
    from ..toy.mixture import GaussianMixture
    from ..toy.posterior import LinearPosterior


def _check_pair(real: torch.Tensor, fake: torch.Tensor) -> None:
    for name, t in (("real", real), ("fake", fake)):
        check(
            isinstance(t, torch.Tensor) and t.ndim == 2 and t.shape[0] > 0,
            f"{name} must be a tensor of shape [N, D] with N > 0, got {list(getattr(t, 'shape', []))}",
        )
        check(bool(torch.isfinite(t).all()), f"{name} contains NaN or inf values")
    check(real.shape[1] == fake.shape[1], f"real and fake dimensions differ: {real.shape[1]} vs {fake.shape[1]}")


def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact pairwise distances (no |a|^2 + |b|^2 - 2ab shortcut): a point equal to a centre's k-th
    neighbour is then exactly on that ball's boundary, whichever chunk computed the distance."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(x: torch.Tensor, k: int, chunk: int | None = None) -> torch.Tensor:
    """Distance from each point of ``x`` to its k-th nearest neighbour in ``x`` (itself excluded); exact,
    screened by matrix products (:func:`guidelab.metrics.knn.knn_radii_multi`). ``chunk`` is unused."""
    from .knn import knn_radii_multi

    check(isinstance(k, int) and not isinstance(k, bool), f"k must be an integer in [1, N-1]={x.shape[0] - 1}, got {k!r}")
    return knn_radii_multi(x, (k,))[k]


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    precision = share of fake samples inside the real manifold (quality);
    recall = share of real samples inside the fake manifold (variation).
    Both sets at once with density/coverage (one real-real pass): :func:`guidelab.metrics.knn.prdc`.
    """
    from .knn import prdc

    _check_pair(real, fake)
    check(isinstance(k, int) and not isinstance(k, bool), f"k must be an integer, got {k!r}")
    out = prdc(real, fake, k_pr=k, k_dc=k)
    return out["precision"], out["recall"]


def _quantiles(sorted_cols: torch.Tensor, m: int) -> torch.Tensor:
    """Linear-interpolation quantiles at m evenly spaced levels of each sorted column."""
    pos = torch.linspace(0, sorted_cols.shape[0] - 1, m, dtype=torch.float64)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(sorted_cols.shape[0] - 1)
    frac = (pos - lo)[:, None]
    return sorted_cols[lo] * (1 - frac) + sorted_cols[hi] * frac


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random directions of W2^2 of projections.

    Unequal sample counts are matched through quantiles. Deterministic for a given ``seed``.
    """
    _check_pair(a, b)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    theta /= theta.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ theta).sort(0).values, (b.double() @ theta).sort(0).values
    if pa.shape[0] != pb.shape[0]:
        m = max(pa.shape[0], pb.shape[0])
        pa, pb = _quantiles(pa, m), _quantiles(pb, m)
    return math.sqrt(((pa - pb) ** 2).mean().item())


def mmd(a: torch.Tensor, b: torch.Tensor, bandwidths: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.5), chunk: int = 2048) -> float:
    """Unbiased squared MMD with a sum of Gaussian kernels exp(-|x-y|^2 / (2 h^2))."""
    _check_pair(a, b)
    check(a.shape[0] > 1 and b.shape[0] > 1, "mmd needs at least 2 samples in each set")
    a, b = a.double(), b.double()

    def ksum(x: torch.Tensor, y: torch.Tensor) -> float:
        tot = 0.0
        for c in x.split(chunk):
            d2 = torch.cdist(c, y) ** 2
            tot += sum(torch.exp(-d2 / (2 * h * h)).sum().item() for h in bandwidths)
        return tot

    n, m, nb = a.shape[0], b.shape[0], len(bandwidths)
    kaa = (ksum(a, a) - n * nb) / (n * (n - 1))
    kbb = (ksum(b, b) - m * nb) / (m * (m - 1))
    return kaa + kbb - 2 * ksum(a, b) / (n * m)


def mean_logp(world: GaussianMixture | LinearPosterior, x: torch.Tensor) -> float:
    """Mean exact log-density ``E[log p(x)]`` of samples under an exact world (quality)."""
    return world.logp(x, 0.0).double().mean().item()
