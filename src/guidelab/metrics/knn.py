"""Exact k-NN balls at matrix-product speed: the shared core of precision/recall and density/coverage.

Distances are screened with ``|a|^2 + |b|^2 - 2 a.b`` (one GEMM per chunk, ``topk`` for neighbours)
and every decision the screen cannot make for sure (a k-th neighbour, a point near a ball's boundary)
is redone with the exact distance of :func:`guidelab.metrics.pointcloud.dist`, so the values are
identical to the exact all-pairs computation. Chunks hold at most ``budget`` distances at a time.
"""

from __future__ import annotations

import torch

from ..errors import check

#: Distances held at once (float64): 2^23 = 64 MiB per chunk whatever N is.
BUDGET = 1 << 23
_EPS = torch.finfo(torch.float64).eps


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact distances |a_i - b_i| for pairs [P, D] x [P, D] -> [P] (as pointcloud.dist, pair by pair)."""
    return torch.cdist(a[:, None], b[:, None], compute_mode="donot_use_mm_for_euclid_dist")[:, 0, 0]


def _rows(n_cols: int, budget: int) -> int:
    return max(1, budget // max(1, n_cols))


def _margin(
    a: torch.Tensor, b: torch.Tensor, a2: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``a2_i + bias_j - 2 a_i.b_j`` [A, B] (one fused GEMM; bias = |b|^2, or |b|^2 - r^2 for a ball test)
    and a per-row bound [A, 1] on its rounding error (8 D eps (|a|^2 + scale), scale = max |b|^2 + max r^2)."""
    m = torch.addmm(bias[None, :], a, b.T, alpha=-2).add_(a2[:, None])
    return m, (8 * a.shape[1] * _EPS) * (a2[:, None] + scale) + 1e-300


def knn_radii_multi(x: torch.Tensor, ks, budget: int = BUDGET) -> dict[int, torch.Tensor]:
    """``{k: [N] distance to the k-th nearest neighbour in x (itself excluded)}`` for every k in ``ks``,
    from one pass over x against x. Exact (values equal to ``dist(x, x).kthvalue(k + 1)``)."""
    x = x.double().contiguous()
    n = x.shape[0]
    ks = sorted({int(k) for k in ks})
    check(all(1 <= k < n for k in ks), f"k must be an integer in [1, N-1]={n - 1}, got {ks}")
    x2 = (x * x).sum(1)
    m = min(n, ks[-1] + 1 + 8)  # candidates per row: k + 1 plus a margin for screening error
    out = {k: torch.empty(n, dtype=torch.float64) for k in ks}
    for s in range(0, n, _rows(n, budget)):
        c = x[s : s + _rows(n, budget)]
        d2, tol = _margin(c, x, x2[s : s + len(c)], x2, float(x2.max()))
        cand = d2.topk(m, dim=1, largest=False)
        rows = torch.arange(len(c))[:, None].expand(-1, m)
        exact = _exact(c[rows.reshape(-1)], x[cand.indices.reshape(-1)]).view(len(c), m)
        exact_sorted = exact.sort(1).values
        for k in ks:
            r = exact_sorted[:, k]
            # the screen is sure the k+1 nearest are among the candidates when the last candidate is farther
            sure = (m == n) | (cand.values[:, -1] - tol[:, 0] > r * r * (1 + 16 * _EPS))
            for i in (~sure).nonzero()[:, 0].tolist():  # rare: redo the row exactly
                r[i] = torch.cdist(c[i : i + 1], x, compute_mode="donot_use_mm_for_euclid_dist")[0].kthvalue(k + 1).values
            out[k][s : s + len(c)] = r
    return out


def inside(
    points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, s: int, rows: int, p2: torch.Tensor, c2: torch.Tensor
) -> torch.Tensor:
    """Boolean [rows, C]: points[s:s+rows] inside the balls (centres, radii), exact on the boundary."""
    p = points[s : s + rows]
    r2 = radii * radii
    margin, tol = _margin(p, centres, p2[s : s + len(p)], c2 - r2, float(c2.max() + r2.max()))  # |p - c|^2 - r^2
    res = margin <= 0
    unsure = margin.abs_() <= tol
    if bool(unsure.any()):
        i, j = unsure.nonzero(as_tuple=True)
        res[i, j] = _exact(p[i], centres[j]) <= radii[j]
    return res


def prdc(
    real: torch.Tensor,
    fake: torch.Tensor,
    k_pr: int = 3,
    k_dc: int = 5,
    budget: int = BUDGET,
    real_radii: dict[int, torch.Tensor] | None = None,
    recall: bool = True,
) -> dict[str, float]:
    """Precision/recall (k-NN manifolds, k=``k_pr``) and density/coverage (k=``k_dc``) of ``fake`` [M, D]
    against ``real`` [N, D] from three passes: real-real (once, both k; or ``real_radii`` from
    :func:`knn_radii_multi`), fake-fake (skipped when not ``recall``) and fake-real. Values equal the
    exact all-pairs ones."""
    real, fake = real.double().contiguous(), fake.double().contiguous()
    rr = real_radii if real_radii is not None else knn_radii_multi(real, (k_pr, k_dc), budget)
    check(k_pr in rr and k_dc in rr, f"real_radii must hold k={k_pr} and k={k_dc}, has {sorted(rr)}")
    r_fake = knn_radii_multi(fake, (k_pr,), budget)[k_pr] if recall else None
    r2, f2 = (real * real).sum(1), (fake * fake).sum(1)
    n, m = real.shape[0], fake.shape[0]
    in_pr = in_dc = 0
    covered = torch.zeros(n, dtype=torch.bool)
    recalled = torch.zeros(n, dtype=torch.bool)
    rows = _rows(n, budget)
    for s in range(0, m, rows):
        pr = inside(fake, real, rr[k_pr], s, rows, f2, r2)  # fake j in real ball i (k_pr)
        in_pr += int(pr.any(1).sum())
        dc = pr if k_dc == k_pr else inside(fake, real, rr[k_dc], s, rows, f2, r2)
        in_dc += int(dc.sum())
        covered |= dc.any(0)
        if r_fake is not None:  # real i in fake ball j
            recalled |= inside(real, fake[s : s + rows], r_fake[s : s + rows], 0, n, r2, f2[s : s + rows]).any(1)
    return {
        "precision": in_pr / m,
        "recall": recalled.double().mean().item() if recall else float("nan"),
        "density": in_dc / (k_dc * m),
        "coverage": covered.double().mean().item(),
    }
