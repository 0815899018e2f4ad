"""Exact k-NN balls at matrix-product speed: the shared core of precision/recall and density/coverage.

Squared distances are *screened* in float32 with one matrix product per chunk of rows: the points are
centred, rounded to float32 and augmented so that ``[a, |a|^2 + s, 1] . [-2 b, 1, |b|^2 + t]`` is
``|a - b|^2 + s + t`` (the norms and a per-row / per-column shift fused into the GEMM). The screen comes
with a rigorous bound on its error (:func:`_tol`), so it only has to *exclude* pairs: every decision it
cannot make for sure (the k nearest neighbours of a point, the pairs near a ball's boundary) is redone
with the exact float64 distance of :func:`guidelab.metrics.pointcloud.dist`, and the values are identical
to the exact all-pairs computation. Columns are reduced in groups of :data:`GROUP` (one ``amin`` pass), so
only the few groups that can hold a neighbour or a ball member are looked at element by element (a
``topk`` or a ``nonzero`` over the whole matrix costs several times the GEMM). Chunks hold at most
``budget`` screened values; memory stays flat whatever N is.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

from ..errors import check

#: Screened distances held at once (float32): 2^22 = 16 MiB per chunk whatever N is.
BUDGET = 1 << 22
#: Columns reduced together by the screen (one ``amin`` per group).
GROUP = 64
_EPS64 = torch.finfo(torch.float64).eps
_U32 = 2.0**-24  # float32 unit roundoff
_PAD = 1e30  # screened value of a padding column: never a neighbour, never in a ball


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact distances |a_i - b_i| for pairs [P, D] x [P, D] -> [P] (as pointcloud.dist, pair by pair)."""
    return torch.cdist(a[:, None], b[:, None], compute_mode="donot_use_mm_for_euclid_dist")[:, 0, 0]


def _rows(n_cols: int, budget: int) -> int:
    return max(1, budget // max(1, n_cols))


class _Side:
    """One point set as a GEMM operand: centred float32 coordinates ``y`` [n, D] and ``|y|^2`` (float64)."""

    def __init__(self, x: torch.Tensor, centre: torch.Tensor):
        self.x = x  # float64, the exact coordinates
        self.y = (x - centre).float()
        self.y2 = self.y.double().square().sum(1)

    def rows(self, shift: torch.Tensor | None = None) -> torch.Tensor:
        """``[y, |y|^2 + shift, 1]`` [n, D + 2] (float32)."""
        n = len(self.y)
        s = self.y2 if shift is None else self.y2 + shift
        return torch.cat([self.y, s.float()[:, None], self.y.new_ones(n, 1)], 1)

    def cols(self, shift: torch.Tensor | None = None) -> torch.Tensor:
        """``[-2 y, 1, |y|^2 + shift]`` [n padded to GROUP, D + 2] (float32, used transposed); padding rows
        screen at _PAD."""
        n, d = self.y.shape
        out = self.y.new_zeros(-(-n // GROUP) * GROUP, d + 2)
        out[:n, :d] = self.y * -2
        out[:n, d] = 1
        s = self.y2 if shift is None else self.y2 + shift
        out[:n, d + 1] = s.float()
        out[n:, d + 1] = _PAD
        return out


def _tol(a: _Side, b: _Side, shift_a: torch.Tensor | None = None, shift_b: torch.Tensor | None = None) -> float:
    """A bound on |screen - exact|, the screen being ``|a - b|^2 + shift_a + shift_b`` from the fused float32
    GEMM and 'exact' the same with the float64 distance of ``pointcloud.dist``.

    Terms (u = 2^-24): rounding the centred points to float32 moves ``|a - b|^2`` by at most
    4u (|a|^2 + |b|^2); the float32 shifted norms are rounded once (u each); a dot product of D + 2 terms
    in any summation order is within (D + 2) u / (1 - (D + 2) u) of the sum of the terms' magnitudes,
    2 |a||b| + |a|^2 + |b|^2 + |shifts| <= 2 (|a|^2 + |b|^2) + |shifts|; the exact distance itself is
    within (D + 2) eps64 relative. Doubled for safety and taken over the chunk's maxima.
    """
    d = a.y.shape[1]
    t = float(a.y2.max()) + float(b.y2.max())
    s = sum(float(v.abs().max()) for v in (shift_a, shift_b) if v is not None and len(v))
    g = (d + 2) * _U32 / (1 - (d + 2) * _U32)
    return 2 * (g * (2 * t + s) + 4 * _U32 * t + 2 * _U32 * (t + s) + (d + 2) * _EPS64 * (2 * t + s)) + 1e-30


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x.mean(0)


def _knn(x: torch.Tensor, ks: list[int], budget: int) -> dict[int, torch.Tensor]:
    side = _Side(x, _centre(x))
    n = x.shape[0]
    m = min(n, ks[-1] + 1 + 8)  # candidates per row: k + 1 plus a margin for the screen's error
    A, B = side.rows(), side.cols().T
    tol = _tol(side, side) * (1 + 1e-6)
    out = {k: torch.empty(n, dtype=torch.float64) for k in ks}
    n_groups = B.shape[1] // GROUP
    step = _rows(B.shape[1], budget)
    buf = A.new_empty(min(step, n), B.shape[1])  # one screen buffer, reused (flat memory)
    for s in range(0, n, step):
        r = min(step, n - s)
        S = torch.matmul(A[s : s + r], B, out=buf[:r])  # [r, n_pad]: screened |x_i - x_j|^2
        G = S.view(r, n_groups, GROUP)
        # the m smallest values lie in the m groups with the smallest minima
        g = G.amin(2).topk(min(m, n_groups), dim=1, largest=False).indices  # [r, mg]
        cols = (g[:, :, None] * GROUP + torch.arange(GROUP)).flatten(1)  # [r, mg * GROUP]
        cand = S.gather(1, cols).topk(m, dim=1, largest=False)  # every other value is >= cand.values[:, -1]
        idx = cols.gather(1, cand.indices)
        rows = torch.arange(s, s + r)[:, None].expand(-1, m)
        exact_sorted = _exact(x[rows.reshape(-1)], x[idx.reshape(-1)]).view(r, m).sort(1).values
        last = cand.values[:, -1].double()
        for k in ks:
            rk = exact_sorted[:, k]
            # sure: no point outside the candidates can be within rk
            sure = (m == n) | (last - tol > rk * rk)
            bad = (~sure).nonzero()[:, 0]
            if len(bad):  # rare: redo those rows exactly
                full = torch.cdist(x[s + bad], x, compute_mode="donot_use_mm_for_euclid_dist")
                rk[bad] = full.kthvalue(k + 1, dim=1).values
            out[k][s : s + r] = rk
    return out


def ball_pairs(
    points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, budget: int = BUDGET
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every pair (point p, centre c) with ``dist(p, c) <= radii[c]`` might hold: ``(p_idx, c_idx, d)`` with
    ``d`` the exact distance of each candidate (a superset of the pairs inside; test ``d <= radii[c]``).
    ``points`` [P, D] and ``centres`` [C, D] float64; the screen is centred on the centres' mean."""
    centre = _centre(centres)
    ps, cs = _Side(points, centre), _Side(centres, centre)
    shift = -(radii * radii)  # screened value |p - c|^2 - r_c^2 <= tol for every pair that may be inside
    A, B = ps.rows(), cs.cols(shift).T
    tol = _tol(ps, cs, None, shift) * (1 + 1e-6)  # (compared in float32)
    n_groups = B.shape[1] // GROUP
    step = _rows(B.shape[1], budget)
    buf = A.new_empty(min(step, len(points)), B.shape[1])
    out_p, out_c, out_d = [], [], []
    for s in range(0, len(points), step):
        r = min(step, len(points) - s)
        S = torch.matmul(A[s : s + r], B, out=buf[:r])
        G = S.view(r, n_groups, GROUP)
        gi, gj = (G.amin(2) <= tol).nonzero(as_tuple=True)  # groups that may hold a member
        if not len(gi):
            continue
        block = G[gi, gj]  # [h, GROUP]
        hi, off = (block <= tol).nonzero(as_tuple=True)
        p_idx, c_idx = gi[hi] + s, gj[hi] * GROUP + off
        out_p.append(p_idx)
        out_c.append(c_idx)
        # exact distances of the candidates, a bounded number of pairs at a time
        pairs = max(1, budget // (8 * points.shape[1]))
        out_d += [_exact(points[p], centres[c]) for p, c in zip(p_idx.split(pairs), c_idx.split(pairs))]
    if not out_p:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0, dtype=torch.float64)
    return torch.cat(out_p), torch.cat(out_c), torch.cat(out_d)


# One remembered real-real pass (precision_recall and density_coverage on the same reference share it).
_CACHE: dict[str, object] = {}


def _key(x: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str((tuple(x.shape), x.dtype)).encode())
    h.update(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def knn_radii_multi(x: torch.Tensor, ks: Iterable[int], budget: int = BUDGET) -> dict[int, torch.Tensor]:
    """``{k: [N] distance to the k-th nearest neighbour in x (itself excluded)}`` for every k in ``ks``,
    from one pass over x against x. Exact (values equal to ``dist(x, x).kthvalue(k + 1)``). The last
    result is remembered (keyed by x's bytes, with k = 3 and 5 computed too when N allows), so
    precision/recall and density/coverage against one reference make one real-real pass."""
    x = x.detach().double().contiguous()
    n = x.shape[0]
    ks = sorted({int(k) for k in ks})
    check(all(1 <= k < n for k in ks), f"k must be an integer in [1, N-1]={n - 1}, got {ks}")
    key = _key(x)
    hit = _CACHE.get("radii") if _CACHE.get("key") == key else None
    if isinstance(hit, dict) and all(k in hit for k in ks):
        return {k: hit[k].clone() for k in ks}
    todo = sorted(set(ks) | {k for k in (3, 5) if k < n})
    radii = _knn(x, todo, budget)
    _CACHE.update(key=key, radii=radii)
    return {k: radii[k].clone() for k in ks}


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
    against ``real`` [N, D] from four screened passes: real-real (once, both k; or ``real_radii`` from
    :func:`knn_radii_multi`), fake-fake (skipped when not ``recall``), fake in real balls and real in fake
    balls. Values equal the exact all-pairs ones."""
    real, fake = real.detach().double().contiguous(), fake.detach().double().contiguous()
    rr = real_radii if real_radii is not None else knn_radii_multi(real, (k_pr, k_dc), budget)
    check(k_pr in rr and k_dc in rr, f"real_radii must hold k={k_pr} and k={k_dc}, has {sorted(rr)}")
    n, m = real.shape[0], fake.shape[0]
    # fake j in the ball of real i: one pass with the larger of the two radii, then the exact test per k
    j, i, d = ball_pairs(fake, real, torch.maximum(rr[k_pr], rr[k_dc]), budget)
    in_pr = torch.zeros(m, dtype=torch.bool)
    in_pr[j[d <= rr[k_pr][i]]] = True
    dc = d <= rr[k_dc][i]
    covered = torch.zeros(n, dtype=torch.bool)
    covered[i[dc]] = True
    rec = float("nan")
    if recall:  # real i in the ball of fake j
        check(1 <= k_pr < m, f"k must be an integer in [1, M-1]={m - 1} for the fake set, got {k_pr}")
        r_fake = _knn(fake, [k_pr], budget)[k_pr]
        i2, j2, d2 = ball_pairs(real, fake, r_fake, budget)
        recalled = torch.zeros(n, dtype=torch.bool)
        recalled[i2[d2 <= r_fake[j2]]] = True
        rec = recalled.double().mean().item()
    return {
        "precision": int(in_pr.sum()) / m,
        "recall": rec,
        "density": int(dc.sum()) / (k_dc * m),
        "coverage": covered.double().mean().item(),
    }
