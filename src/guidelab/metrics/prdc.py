"""Density and coverage (Naeem et al. 2020, arXiv 2002.09797), k-NN balls around the real samples."""

from __future__ import annotations

import torch

from ..errors import check
from .knn import prdc
from .pointcloud import _check_pair


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5, chunk: int | None = None) -> tuple[float, float]:
    """(density, coverage) of ``fake`` [M, D] against ``real`` [N, D] (Naeem et al. 2020, Eqs. 3-4).

    With ``B_i`` the ball around real sample i reaching its k-th nearest real neighbour:
    density = 1/(kM) sum_j sum_i 1[Y_j in B_i] (quality; ~1 when both sets match, unbounded above);
    coverage = 1/N sum_i 1[some Y_j in B_i] (diversity, in [0, 1]).
    Exact, screened by matrix products in bounded chunks (:func:`guidelab.metrics.knn.prdc`; ``chunk`` unused).
    """
    _check_pair(real, fake)
    check(isinstance(k, int) and not isinstance(k, bool), f"k must be an integer, got {k!r}")
    out = prdc(real, fake, k_pr=k, k_dc=k, recall=False)
    return out["density"], out["coverage"]
