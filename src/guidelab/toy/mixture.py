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

    def __init__(self, phi, mu, Sigma, *, dtype: torch.dtype = torch.float32, chunk: int = 256):
        phi = torch.as_tensor(phi, dtype=torch.float64)
        mu = torch.as_tensor(mu, dtype=torch.float64)
        Sigma = torch.as_tensor(Sigma, dtype=torch.float64)
        check(phi.ndim == 1 and mu.ndim == 2 and mu.shape[0] == phi.shape[0] and Sigma.shape == mu.shape + mu.shape[-1:],
              "GaussianMixture needs phi [K], mu [K, D], Sigma [K, D, D]")
        check(bool((phi > 0).all()), "mixture weights phi must be > 0")
        L, Q = torch.linalg.eigh(Sigma)
        check(bool((L > 0).all()), "covariances must be positive definite")
        self.chunk, self.dim = chunk, mu.shape[1]
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
        """Precompute a planar layout: one contiguous [K] vector per (eigen-direction j, coordinate i).

        Everything below is element-wise or a per-row reduction (no matrix multiply), so a row's
        result never depends on the other rows: the exact worlds are bit-for-bit batch-invariant.
        """
        self.dtype = dtype
        K, D, g = len(self._phi), self.dim, self._group
        self.log_phi = self._phi.log().to(dtype)
        self.mu, self.L, self.Q = self._mu.to(dtype), self._L.to(dtype), self._Q.to(dtype)
        self._QT = [[self.Q[:, i, j].contiguous() for i in range(D)] for j in range(D)]  # Q[k, i, j] as [K]
        self._b = [-(self.Q[:, :, j] * self.mu).sum(1) for j in range(D)]             # -q_j . mu_k: [K]
        self._Lg = [self.L[::g, j].contiguous() for j in range(D)]                     # [K / g] per j

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
        check(isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] == self.dim,
              f"x must be a tensor of shape [batch, {self.dim}], got {list(getattr(x, 'shape', []))}")
        check_finite(x)
        return as_sigma(sigma, x)

    def _terms(self, x: torch.Tensor, sigma: torch.Tensor, need_score: bool):
        """Log-density and (optionally) score, in cache-sized chunks and in the mixture's dtype.

        Differentiable (autograd through ``logp`` gives the score), no in-place ops on the graph.
        """
        out_logp, out_score = [], []
        K, G, floor = len(self), len(self) // self._group, _FLOOR[self.dtype]
        const = -0.5 * self.dim * math.log(2 * math.pi)
        for xs, ss in zip(x.to(self.dtype).split(self.chunk), sigma.to(self.dtype).split(self.chunk)):
            N = xs.shape[0]
            s2 = (ss ** 2)[:, None]
            logw, r = self.log_phi.view(1, G, -1), []
            for j in range(self.dim):
                y = self._b[j].expand(N, K)
                for i in range(self.dim):
                    y = torch.addcmul(y, xs[:, i:i + 1], self._QT[j][i])
                y = y.view(N, G, -1)                                           # q_jk . (x - mu_k)
                inv = (self._Lg[j] + s2).reciprocal()[..., None]               # 1 / (L_jk + sigma^2)
                rj = y * inv
                logw = torch.addcmul(logw + 0.5 * inv.log(), y, rj, value=-0.5)  # -y^2/2v - log(v)/2
                r.append(rj.view(N, K))
            # log-sum-exp by hand, flooring each log-ratio to the row maximum at FLOOR: a floored
            # component has posterior < e^FLOOR (invisible in this dtype), and exp() of huge negative
            # numbers, slow on CPUs, is never taken.
            logw = logw.view(N, K)
            m = logw.detach().amax(-1, keepdim=True)
            p = (logw - m).clamp_min(floor).exp()
            total = p.sum(-1, keepdim=True)
            out_logp.append((m + total.log()).squeeze(-1) + const)
            if need_score:
                p = p / total                                                  # posterior over components
                # score_i = -sum_k p_k sum_j Q_k[i, j] r_jk
                out_score.append(-torch.stack([(sum(rj * self._QT[j][i] for j, rj in enumerate(r)) * p).sum(-1)
                                               for i in range(self.dim)], 1))
        return torch.cat(out_logp), (torch.cat(out_score) if need_score else None)

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
