"""Exact Gaussian mixtures under heat diffusion: log-density, score, denoiser and samples.

``p(x; sigma) = sum_k phi_k N(x; mu_k, Sigma_k + sigma^2 I)``. With ``Sigma_k = Q_k diag(L_k) Q_k^T``
the noisy covariance is ``Q_k diag(L_k + sigma^2) Q_k^T``, so every sigma costs no new factorisation.
Everything is evaluated in log space (log-sum-exp) so no point, however far, gives NaN.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import as_sigma, check, check_finite
from ..fused import Kernel

if TYPE_CHECKING:
    import numpy as np

#: Rows evaluated at once by the exact evaluation (fixed, whatever the batch: memory stays bounded).
ROWS = 4096
_LINE_FLOOR = {torch.float16: -8.0, torch.bfloat16: -60.0, torch.float32: -60.0, torch.float64: -600.0}
#: (row, component) pairs per block of score_fast: the [g, rows G] weights stay in cache.
_LINE_BLOCK = 2**19
#: (row, component) pairs per block of score_fast(fused=True) (measured best at 2^20 on tree A).
_FUSED_BLOCK = 2**20
_FLOOR = {torch.float16: -10.0, torch.bfloat16: -80.0, torch.float32: -80.0, torch.float64: -700.0}


_WORK = threading.local()


def _workspace(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat scratch tensor of ``numel`` elements, kept per thread and reused across calls."""
    ws = getattr(_WORK, "buf", None)
    if ws is None or ws.dtype != dtype or ws.numel() < numel:
        ws = _WORK.buf = torch.empty(numel, dtype=dtype)
    return ws[:numel]


def _carve(ws: torch.Tensor, unit: int, counts: Sequence[int]) -> list[torch.Tensor]:
    """Consecutive views of ``ws``, the i-th of ``counts[i] * unit`` elements."""
    out, a = [], 0
    for c in counts:
        out.append(ws[a : a + c * unit])
        a += c * unit
    return out


def _lines_fused(
    x: torch.Tensor,
    s2: torch.Tensor,
    e0: torch.Tensor,
    Qx: torch.Tensor,
    LDG: torch.Tensor,
    lphi2: torch.Tensor,
    dG: torch.Tensor,
    ddG: torch.Tensor,
    d3: torch.Tensor,
    nQGt: torch.Tensor,
    floor: float,
    g: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``GaussianMixture._lines_block`` as a function of tensors, for a :class:`~guidelab.fused.Kernel`: the
    same formulas, the members' log-weights ``l_k`` written out per k (not a matrix product), so that the
    compiler fuses ``A, B, C -> S0, S1`` (g exps) into one loop over [n, G]. Returns (score [n, D], sum_G S0)."""
    n, D = x.shape
    E = torch.addmm(e0, x, Qx).view(n, D, -1)  # e_jG
    V = (LDG + s2).reciprocal().view(n, D, -1)  # v_jG
    e, v = [E[:, j] for j in range(D)], [V[:, j] for j in range(D)]
    A = lphi2 + sum(v[j].log() - v[j] * e[j] * e[j] for j in range(D))
    B = sum(v[j] * e[j] * dG[j] for j in range(D))
    C = sum(v[j] * ddG[j] for j in range(D))
    S0 = S1 = torch.zeros_like(A)
    for k in range(g):
        wk = (0.5 * A + k * B - (0.5 * k * k) * C).clamp_min(floor).exp()
        S0, S1 = S0 + wk, S1 + k * wk
    t = V * (E * S0[:, None] - d3 * S1[:, None])
    W = S0.sum(1)
    return torch.mm(nQGt, t.view(n, -1).T).T / W[:, None], W


_LINES = Kernel(_lines_fused)


class GaussianMixture:
    """A D-dimensional Gaussian mixture; a denoiser ``D(x, sigma) = E[x0 | x]`` like any other."""

    def __init__(
        self,
        phi: torch.Tensor | np.ndarray | Sequence[Any],
        mu: torch.Tensor | np.ndarray | Sequence[Any],
        Sigma: torch.Tensor | np.ndarray | Sequence[Any],
        *,
        dtype: torch.dtype = torch.float32,
        chunk: int | None = None,
    ) -> None:
        phi = torch.as_tensor(phi, dtype=torch.float64)
        mu = torch.as_tensor(mu, dtype=torch.float64)
        Sigma = torch.as_tensor(Sigma, dtype=torch.float64)
        check(
            phi.ndim == 1 and mu.ndim == 2 and mu.shape[0] == phi.shape[0] and Sigma.shape == mu.shape + mu.shape[-1:],
            "GaussianMixture needs phi [K], mu [K, D], Sigma [K, D, D]",
        )
        check(bool((phi > 0).all()), "mixture weights phi must be > 0")
        L, Q = torch.linalg.eigh(Sigma)
        check(bool((L > 0).all()), "covariances must be positive definite")
        check(chunk is None or (isinstance(chunk, int) and chunk >= 1), f"chunk must be None or an integer >= 1, got {chunk!r}")
        # Rows per chunk: ~64k (row, component) terms stay in L2 (on the tree 15-30% faster than 256 rows).
        self.chunk, self.dim = chunk or max(1, 2**16 // len(phi)), mu.shape[1]
        self._phi = phi / phi.sum()
        self._cdf = self._phi.cumsum(0)
        self._mu, self._L, self._Q = mu, L, Q
        # Consecutive components that share one covariance (the tree's 8 per branch) share the
        # sigma-dependent terms: they are computed once per group.
        same = (Sigma[1:] == Sigma[:-1]).flatten(1).all(1).tolist() + [False]
        runs, n = [], 1
        for s_ in same:
            if s_:
                n += 1
            else:
                runs.append(n)
                n = 1
        self._group = runs[0] if len(set(runs)) == 1 else 1
        self._set_dtype(dtype)

    def _set_dtype(self, dtype: torch.dtype) -> None:
        """Precompute a grouped planar layout (``g`` consecutive components share one covariance).

        Per eigen-direction j and group G: ``q_jG . x - cbar_jG`` is the point's coordinate along
        q_j relative to the group's centre, ``c'_jk`` each mean's offset from it; the quadratic form
        of component k is then ``inv_jG (qx'_jG - c'_jk)^2``, expanded so that only the k-dependent
        terms are evaluated per component. Every operation is element-wise or a per-row reduction (no
        matrix multiply), so a row's result never depends on the other rows: the exact worlds are
        bit-for-bit batch-invariant.
        """
        self.dtype = dtype
        K, D, g = len(self._phi), self.dim, self._group
        G = K // g
        self.log_phi = self._phi.log().to(dtype)
        self.mu, self.L, self.Q = self._mu.to(dtype), self._L.to(dtype), self._Q.to(dtype)
        c = torch.einsum("kij,ki->kj", self._Q, self._mu).view(G, g, D)  # q_jk . mu_k (float64)
        cbar = c.mean(1)  # [G, D] group centres
        cp = c - cbar[:, None]  # c'_jk: [G, g, D]
        # Per-component constants are laid out [g, G] (member, group): the inner loops run over the
        # G groups, and per-(point, group) terms broadcast over the members.
        self._log_phi_g = self.log_phi.view(G, g).T.contiguous()
        self._cp = [cp[:, :, j].T.to(dtype).contiguous() for j in range(D)]  # [g, G] per j
        self._cp2 = [(-0.5 * cp[:, :, j] ** 2).T.to(dtype).contiguous() for j in range(D)]
        self._cbar = [(-cbar[:, j]).to(dtype).contiguous() for j in range(D)]  # -cbar_jG: [G]
        self._Qg = [[self._Q[::g, i, j].to(dtype).contiguous() for i in range(D)] for j in range(D)]  # [G]
        self._Lg = [self.L[::g, j].contiguous() for j in range(D)]  # [G] per j
        # Line groups (the tree's branches): members equally spaced along a line, equal weights. Then a
        # member's log-weight is a quadratic in its index k (score_fast, _score_lines).
        lphi = self._phi.log().view(G, g)
        step_ = (cp[:, -1] - cp[:, 0]) / max(g - 1, 1)  # [G, D] spacing of the members' c'
        fit = cp[:, :1] + torch.arange(g, dtype=torch.float64)[None, :, None] * step_[:, None]
        self._lines = g > 1 and bool(
            (lphi - lphi[:, :1]).abs().max() <= 1e-12 and (fit - cp).abs().max() <= 1e-12 * (1 + float(cp.abs().max()))
        )
        Qs = self._Q[::g].permute(1, 2, 0)  # [i, j, G]
        self._Qx = Qs.reshape(D, D * G).to(dtype).contiguous()  # x @ _Qx: q_jG . x at column j G + G
        self._e0 = (-(cbar.T + cp[:, 0].T)).reshape(D * G).to(dtype)  # -(cbar_jG + c'_j0)
        k = torch.arange(g, dtype=torch.float64)
        # l_k = A / 2 + k B - k^2 C / 2 (_lines_block)
        self._Mk = torch.stack([torch.full((g,), 0.5, dtype=torch.float64), k, -0.5 * k * k], 1).to(dtype)  # [g, 3]
        self._kk = torch.stack([torch.ones(g, dtype=torch.float64), k]).to(dtype)  # [2, g]: rows 1, k
        self._dDG, self._ddDG = step_.T.to(dtype).contiguous(), (step_.T**2).to(dtype).contiguous()  # d_jG, d_jG^2 [D, G]
        self._dG, self._ddG = list(self._dDG), list(self._ddDG)  # [G] per j (contiguous rows)
        self._d3 = self._dDG[None]  # d_jG as [1, D, G]
        self._LDG = self._L[::g].T.reshape(D * G).to(dtype).contiguous()  # L_jG at j G + G
        self._lphi2 = (2 * lphi[:, 0]).to(dtype)  # 2 log phi_G
        self._nQGt = (-self._Qx).contiguous()  # -q_jG as [D, D G]

    def __len__(self) -> int:
        return self.log_phi.shape[0]

    def to(self, dtype: torch.dtype) -> "GaussianMixture":
        """The same mixture evaluated in another floating-point precision."""
        new = object.__new__(GaussianMixture)
        new.__dict__.update(self.__dict__)
        new._set_dtype(dtype)
        return new

    # -----------------------------------------------------------------------------------------

    def _prepare(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        check(
            isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] == self.dim,
            f"x must be a tensor of shape [batch, {self.dim}], got {list(getattr(x, 'shape', []))}",
        )
        check_finite(x)
        return as_sigma(sigma, x)

    def _group_terms(
        self, x: torch.Tensor, s2: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Per-(point, group) terms: ``qx'_jG``, ``v_jG = 1 / (L_jG + sigma^2)``, ``b_jG = v qx'`` and
        ``base = sum_j (log v_j - b_j qx'_j) / 2``, each [N, G] (lists over j)."""
        N, G, D = x.shape[0], len(self) // self._group, self.dim
        qx, inv, B = [], [], []
        base: torch.Tensor | float = 0.0
        for j in range(D):
            q = self._cbar[j].expand(N, G)
            for i in range(D):
                q = torch.addcmul(q, x[:, i : i + 1], self._Qg[j][i])  # qx'_jG = q_jG . x - cbar_jG
            v = (self._Lg[j] + s2).reciprocal()  # v_jG = 1 / (L_jG + sigma^2)
            b = v * q
            base = base + 0.5 * (v.log() - b * q)
            qx.append(q)
            inv.append(v)
            B.append(b)
        assert isinstance(base, torch.Tensor)
        return qx, inv, B, base

    def _terms(self, x: torch.Tensor, sigma: torch.Tensor, need_score: bool) -> tuple[Any, Any]:
        """Log-density, or the score when ``need_score``, in the mixture's dtype.

        Returns ``(logp, None)`` or ``(None, score)``. Rows are evaluated in fixed-size chunks of
        :data:`ROWS` (memory bounded whatever the batch; rows are independent, so the chunking is
        invisible). Differentiable (autograd through ``logp`` gives the score), no in-place ops on the graph.
        """
        if x.shape[0] <= ROWS:
            return self._terms_rows(x, sigma, need_score)
        parts = [self._terms_rows(x[a : a + ROWS], sigma[a : a + ROWS], need_score) for a in range(0, x.shape[0], ROWS)]
        k = 1 if need_score else 0
        out = torch.cat([p[k] for p in parts])
        return (None, out) if need_score else (out, None)

    def _terms_rows(self, x: torch.Tensor, sigma: torch.Tensor, need_score: bool) -> tuple[Any, Any]:
        """:meth:`_terms` on one chunk of rows: per-(point, group) terms for all its rows, per-component
        terms in sub-chunks of ``self.chunk`` rows that stay in cache."""
        N, G, D = x.shape[0], len(self) // self._group, self.dim
        x, s2 = x.to(self.dtype), (sigma.to(self.dtype) ** 2)[:, None]
        qx, inv, B, base = self._group_terms(x, s2)
        # log(phi_k N(x; mu_k, Sigma_k + sigma^2 I)) + (D/2) log(2 pi)
        #   = log phi_k + sum_j [log(v_j)/2 - v_j qx'_j^2 / 2 + (v_j qx'_j) c'_jk - v_j c'_jk^2 / 2]
        out, sums = [], []
        for a in range(0, N, self.chunk):
            rows = slice(a, a + self.chunk)
            logw = base[rows, None, :] + self._log_phi_g  # [n, g, G]
            for j in range(D):
                logw = torch.addcmul(logw, B[j][rows, None, :], self._cp[j])
                logw = torch.addcmul(logw, inv[j][rows, None, :], self._cp2[j])
            logw = logw.flatten(1)
            if not need_score:
                # log-sum-exp by hand, flooring each log-ratio to the row maximum at FLOOR: a floored
                # component has posterior < e^FLOOR (invisible in this dtype).
                m = logw.detach().amax(-1, keepdim=True)
                total = (logw - m).clamp_min(_FLOOR[self.dtype]).exp().sum(-1)
                out.append(m.squeeze(-1) + total.log())
            else:
                p = torch.softmax(logw, -1).view(logw.shape[0], -1, G)  # posterior over components
                sums.append(torch.stack([p.sum(1)] + [(p * self._cp[j]).sum(1) for j in range(D)]))
        if not need_score:
            return torch.cat(out) - 0.5 * D * math.log(2 * math.pi), None
        # score = sum_k p_k (Sigma_k + sigma^2 I)^-1 (mu_k - x)
        #       = sum_G sum_j q_jG v_jG (M_jG - P_G qx'_jG),  P_G = sum_{k in G} p_k,  M_jG = sum_{k in G} p_k c'_jk
        P, *M = torch.cat(sums, 1)
        t = [inv[j] * (M[j] - P * qx[j]) for j in range(D)]
        return None, torch.stack([sum((t[j] * self._Qg[j][i]).sum(-1) for j in range(D)) for i in range(D)], 1)

    def logp(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """Exact ``log p(x; sigma)``, shape [batch]."""
        sigma = self._prepare(x, sigma)
        return self._terms(x, sigma, False)[0].to(x.dtype)

    def score(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """Exact ``grad_x log p(x; sigma)``, shape [batch, D]."""
        sigma = self._prepare(x, sigma)
        return self._terms(x, sigma, True)[1].to(x.dtype)

    def score_fast(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0, *, fused: bool = False) -> torch.Tensor:
        """The exact score (as :meth:`score`, to float rounding) at a fraction of the cost on a mixture of
        line groups (the tree): what the toy training loss uses. Not batch-invariant in the last bits (it
        uses small matrix products); a mixture without line groups gets :meth:`score` itself. [batch, D].

        ``fused``: run the element-wise chains as one compiled kernel (:mod:`guidelab.fused`; ~1.6x faster on
        the tree, equal to float rounding, the same bits whatever the thread count); plain torch if it cannot
        be compiled (a warning is logged)."""
        sigma = self._prepare(x, sigma)
        if not self._lines:
            return self._terms(x, sigma, True)[1].to(x.dtype)
        parts = [self._score_lines(x[a : a + ROWS], sigma[a : a + ROWS], fused) for a in range(0, x.shape[0], ROWS)]
        return torch.cat(parts).to(x.dtype)

    def _score_lines(self, x: torch.Tensor, sigma: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """Every component of a mixture of line groups. With ``e_jG = q_jG . x - (cbar_jG + c'_j0)`` the
        point's offset from the group's first member along eigen-direction j, ``d_jG`` the members' spacing
        and ``v_jG = 1 / (L_jG + sigma^2)``, member k of group G has log-weight (a quadratic in k)
        ``l_k = A / 2 + k B - k^2 C / 2``, ``A = 2 log phi_G + sum_j (log v_j - v_j e_j^2)``,
        ``B = sum_j v_j d_j e_j``, ``C = sum_j v_j d_j^2``: one small matrix product gives every ``l_k``,
        then one exp each, and the posterior sums need only ``S0 = sum_k w_k`` and ``S1 = sum_k k w_k``
        (one more small product). ``score = -sum_G sum_j q_jG v_jG (e_jG S0 - d_jG S1) / sum_G S0``.

        Log-weights are at most ``log(v_1 v_2) / 2 < 88``, so the weights are taken as they are (no max
        pass); each is floored at e^FLOOR (invisible in the dtype; subnormals are 10-100x slower in every
        op). A row whose total falls below e^(FLOOR / 2) (far from every component) is evaluated by the
        general path instead. Rows go in blocks whose [g, rows G] weights stay in cache.
        """
        N, D = x.shape[0], self.dim
        xd, s2 = x.to(self.dtype), (sigma.to(self.dtype) ** 2)[:, None]
        score, W = torch.empty(N, D, dtype=self.dtype), torch.empty(N, dtype=self.dtype)
        if fused:
            rows, floor = max(1, _FUSED_BLOCK // len(self)), _LINE_FLOOR[self.dtype]
            consts = (self._e0, self._Qx, self._LDG, self._lphi2, self._dDG, self._ddDG, self._d3, self._nQGt)
            for a in range(0, N, rows):
                score[a : a + rows], W[a : a + rows] = _LINES(xd[a : a + rows], s2[a : a + rows], *consts, floor, self._group)
        else:
            rows = max(1, _LINE_BLOCK // len(self))
            for a in range(0, N, rows):
                self._lines_block(xd[a : a + rows], s2[a : a + rows], score[a : a + rows], W[a : a + rows])
        far = (W < math.exp(_LINE_FLOOR[self.dtype] / 2)).nonzero()[:, 0]
        if len(far):
            score[far] = self._terms_rows(x[far], sigma[far], True)[1]
        return score

    def _lines_block(self, x: torch.Tensor, s2: torch.Tensor, score: torch.Tensor, W: torch.Tensor) -> None:
        """:meth:`_score_lines` on one block of rows: writes the score [n, D] and ``sum_G S0`` [n]. Every
        temporary is a view of one per-thread workspace, reused across calls (with fresh tensors, score_fast
        called in a loop page-faulted ~3500 times per call here, a third of its time)."""
        n, g, D = x.shape[0], self._group, self.dim
        G = len(self) // g
        E, V, VE, buf, w, S = _carve(_workspace(n * G * (3 * D + 5 + g), self.dtype), n * G, (D, D, D, 3, g, 2))
        torch.addmm(self._e0, x, self._Qx, out=E.view(n, D * G))  # e_jG at column j G + G
        torch.add(self._LDG, s2, out=V.view(n, D * G)).reciprocal_()  # v_jG, same layout
        torch.mul(V, E, out=VE)
        e, v, ve = ([t.view(n, D, G)[:, j] for j in range(D)] for t in (E, V, VE))
        A, B, C = buf.view(3, n, G)
        A.copy_(v[0])
        for j in range(1, D):
            A.mul_(v[j])
        A.log_().add_(self._lphi2)
        torch.mul(ve[0], self._dG[0], out=B)
        torch.mul(v[0], self._ddG[0], out=C)
        for j in range(D):
            A.addcmul_(ve[j], e[j], value=-1)
            if j:
                B.addcmul_(ve[j], self._dG[j])
                C.addcmul_(v[j], self._ddG[j])
        wk = torch.mm(self._Mk, buf.view(3, n * G), out=w.view(g, n * G))  # l_k = A / 2 + k B - k^2 C / 2
        torch.mm(self._kk, wk.clamp_min_(_LINE_FLOOR[self.dtype]).exp_(), out=S.view(2, n * G))
        S0, S1 = S.view(2, n, G)
        # t_jG = v_jG (e_jG S0 - d_jG S1) (in VE's place); score = -(sum_jG q_jG t_jG) / W
        t = torch.mul(E.view(n, D, G), S0[:, None], out=VE.view(n, D, G))
        t.addcmul_(self._d3, S1[:, None], value=-1).mul_(V.view(n, D, G))
        torch.sum(S0, 1, out=W)
        # [D, D G] x [D G, n]: ~6x faster here than [n, D G] x [D G, D] (a tall-skinny product)
        torch.div(torch.mm(self._nQGt, t.view(n, D * G).T).T, W[:, None], out=score)

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor, **cond: Any) -> torch.Tensor:
        """Exact ``E[x0 | x] = x + sigma^2 score`` (Tweedie), shape [batch, D]."""
        sigma = self._prepare(x, sigma)
        return x + sigma[:, None] ** 2 * self._terms(x, sigma, True)[1].to(x.dtype)

    __call__ = denoise

    def sample(self, n: int, sigma: float | torch.Tensor = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples of the data convolved with ``N(0, sigma^2 I)``, shape [n, D]."""
        check(isinstance(n, int) and n >= 0, f"n must be an integer >= 0, got {n!r}")
        sigma = as_sigma(sigma, torch.empty(n, 0, dtype=self.dtype))
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        k = torch.searchsorted(self._cdf, u).clamp_max(len(self) - 1)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.dtype)
        std = (self.L[k] + sigma[:, None] ** 2).sqrt()
        return self.mu[k] + torch.einsum("nij,nj->ni", self.Q[k], std * z)

    def mean(self) -> torch.Tensor:
        return (self.log_phi.exp()[:, None] * self.mu).sum(0)
