"""Density and coverage (Naeem et al. 2020, arXiv 2002.09797), k-NN balls around the real samples."""

from __future__ import annotations

import torch

from .pointcloud import _check_pair, dist, knn_radii


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5, chunk: int = 2048) -> tuple[float, float]:
    """(density, coverage) of ``fake`` [M, D] against ``real`` [N, D] (Naeem et al. 2020, Eqs. 3-4).

    With ``B_i`` the ball around real sample i reaching its k-th nearest real neighbour:
    density = 1/(kM) sum_j sum_i 1[Y_j in B_i] (quality; ~1 when both sets match, unbounded above);
    coverage = 1/N sum_i 1[some Y_j in B_i] (diversity, in [0, 1]).
    """
    _check_pair(real, fake)
    real, fake = real.double(), fake.double()
    r = knn_radii(real, k, chunk)
    inside_count = 0.0
    covered = torch.zeros(real.shape[0], dtype=torch.bool)
    for c in fake.split(chunk):
        inside = dist(c, real) <= r          # [chunk, N]: Y_j in B_i
        inside_count += inside.sum().item()
        covered |= inside.any(0)
    return inside_count / (k * fake.shape[0]), covered.double().mean().item()
