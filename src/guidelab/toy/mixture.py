"""Exact Gaussian mixtures under heat diffusion: log-density, score, denoiser and samples.

``p(x; sigma) = sum_k phi_k N(x; mu_k, Sigma_k + sigma^2 I)``. With ``Sigma_k = Q_k diag(L_k) Q_k^T``
the noisy covariance is ``Q_k diag(L_k + sigma^2) Q_k^T``, so every sigma costs no new factorisation.
Everything is evaluated in log space (log-sum-exp) so no point, however far, gives NaN.
"""

from __future__ import annotations

import math

import torch

from ..errors import as_sigma, check, check_finite

_FLOOR = {torch.float16: -10.0, torch.bfloat16: -80.0, torch.float32: -80.0, torch.float64: -700.0}


class GaussianMixture:
    """A D-dimensional Gaussian mixture; a denoiser ``D(x, sigma) = E[x0 | x]`` like any other."""

    def __init__(self, phi, mu, Sigma, *, dtype: torch.dtype = torch.float32, chunk: int | None = None):
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

    def __len__(self) -> int:
        return self.log_phi.shape[0]

    def to(self, dtype: torch.dtype) -> "GaussianMixture":
        """The same mixture evaluated in another floating-point precision."""
        new = object.__new__(GaussianMixture)
        new.__dict__.update(self.__dict__)
        new._set_dtype(dtype)
        return new

    # -----------------------------------------------------------------------------------------

    def _prepare(self, x, sigma):
        check(
            isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] == self.dim,
            f"x must be a tensor of shape [batch, {self.dim}], got {list(getattr(x, 'shape', []))}",
        )
        check_finite(x)
        return as_sigma(sigma, x)

    def _terms(self, x: torch.Tensor, sigma: torch.Tensor, need_score: bool):
        """Log-density, or the score when ``need_score``, in the mixture's dtype.

        Returns ``(logp, None)`` or ``(None, score)``. Per-(point, group) terms are computed for the
        whole batch; per-component terms in chunks of rows that stay in cache. Differentiable
        (autograd through ``logp`` gives the score), no in-place ops on the graph.
        """
        N, G, D = x.shape[0], len(self) // self._group, self.dim
        x, s2 = x.to(self.dtype), (sigma.to(self.dtype) ** 2)[:, None]
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
        # log(phi_k N(x; mu_k, Sigma_k + sigma^2 I)) + (D/2) log(2 pi)
        #   = log phi_k + sum_j [log(v_j)/2 - v_j qx'_j^2 / 2 + (v_j qx'_j) c'_jk - v_j c'_jk^2 / 2]
        out, sums = [], []
        for a in range(0, N, self.chunk):
            rows = slice(a, a + self.chunk)
            assert isinstance(base, torch.Tensor)
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

    def logp(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """Exact ``log p(x; sigma)``, shape [batch]."""
        sigma = self._prepare(x, sigma)
        return self._terms(x, sigma, False)[0].to(x.dtype)

    def score(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """Exact ``grad_x log p(x; sigma)``, shape [batch, D]."""
        sigma = self._prepare(x, sigma)
        return self._terms(x, sigma, True)[1].to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """Exact ``E[x0 | x] = x + sigma^2 score`` (Tweedie), shape [batch, D]."""
        sigma = self._prepare(x, sigma)
        return x + sigma[:, None] ** 2 * self._terms(x, sigma, True)[1].to(x.dtype)

    __call__ = denoise

    def sample(self, n: int, sigma=0.0, generator: torch.Generator | None = None) -> torch.Tensor:
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
