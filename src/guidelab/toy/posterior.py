"""Exact posteriors of linear measurements: ``p(x0 | y)`` for ``y = A x0 + s n`` under a Gaussian-mixture prior.

Per prior component ``k`` (Gaussian conditioning, Bishop 2006 eqs. 2.113-2.117)::

    M_k = A S_k A^T + s^2 I,   K_k = S_k A^T M_k^-1
    m_k = mu_k + K_k (y - A mu_k),   C_k = (I - K_k A) S_k (I - K_k A)^T + s^2 K_k K_k^T   (Joseph form)
    w_k ∝ phi_k N(y; A mu_k, M_k)                                                          (evidence)

so the posterior is again a Gaussian mixture, whose heat-diffused density, score and denoiser are
exact at every sigma (:class:`~guidelab.toy.GaussianMixture`).

Noise-free (``s = 0``) the posterior lives on the affine subspace ``{x: A x = y}``. With the SVD
``A = U Sigma V^T`` split into the row space ``V_r`` (rank r) and the null space ``V_n``, the
constraint is ``a = V_r^T x = c = Sigma_r^-1 U_r^T y`` and only ``z = V_n^T x`` is free; conditioning
component k on ``a = c`` (Schur complement) gives a (d - r)-dimensional mixture of z. Heat diffusion
keeps the split: ``p(x; sigma) = N(a; c, sigma^2 I_r) p_z(z; sigma)``. At sigma = 0, ``logp`` is the
density on the subspace (w.r.t. its (d - r)-dimensional Lebesgue measure) and ``-inf`` off it.

Components whose posterior weight underflows float64 (below 1e-308) drop out, which changes ``logp``
only far in the tails (hundreds of nats below the mode). Everything is computed in float64 and
evaluated in the prior's dtype; projections are element-wise
products and row sums (no GEMM), so the worlds stay batch-invariant like the priors.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from ..errors import GuidelabError, as_sigma, check, check_finite
from .mixture import GaussianMixture


def _components(prior: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(phi [K], mu [K, d], Sigma [K, d, d])`` of a toy mixture, in float64."""
    check(
        isinstance(prior, GaussianMixture),
        f"prior must be a toy Gaussian-mixture world (toy.tree('A'), toy.GaussianMixture, "
        f"conditional_tree().world(label), toy.digits_gmm()), got {type(prior).__name__}",
    )
    p = prior.to(torch.float64)
    Sigma = torch.einsum("kij,kj,klj->kil", p.Q, p.L, p.Q)
    return p.log_phi.exp(), p.mu, 0.5 * (Sigma + Sigma.transpose(1, 2))


def _groups(Sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive runs of identical covariances: (first index of each run [G], run id per component [K])."""
    new = torch.ones(len(Sigma), dtype=torch.bool)
    new[1:] = ~(Sigma[1:] == Sigma[:-1]).flatten(1).all(1)
    return torch.nonzero(new).squeeze(1), new.cumsum(0) - 1


def _gauss_logpdf(r: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``log N(r; 0, M)`` for residuals r [K, m] and covariances M [K, m, m] (Cholesky)."""
    Lc = torch.linalg.cholesky(M)
    u = torch.linalg.solve_triangular(Lc, r[..., None], upper=False)[..., 0]
    logdet = 2 * Lc.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * (u.square().sum(-1) + logdet + r.shape[-1] * math.log(2 * math.pi))


def _project(x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``x @ V`` for x [B, d], V [d, k] as an element-wise product and row sum (batch-invariant)."""
    return (x[:, :, None] * V).sum(1)


class LinearPosterior:
    """The exact posterior ``p(x0 | y)`` of a Gaussian-mixture prior, a world like the priors.

    ``logp(x, sigma)``, ``score``, ``denoise`` (it *is* a denoiser ``D(x, sigma)``) and ``sample(n,
    sigma)`` are exact at every sigma; ``log_evidence`` is ``log p(y)``; ``weights`` [K] the posterior
    component weights; ``consistency(x)`` the per-sample measurement error ``|A x - y|``.
    """

    def __init__(self, prior: GaussianMixture, A: torch.Tensor, y: torch.Tensor, noise_std: float):
        phi, mu, S = _components(prior)
        d = mu.shape[1]
        check(
            isinstance(A, torch.Tensor) and A.ndim == 2 and A.shape[1] == d and A.shape[0] >= 1,
            f"A must be a tensor of shape [m, d={d}], got {list(getattr(A, 'shape', []))}",
        )
        check(
            isinstance(y, torch.Tensor) and y.shape == A.shape[:1],
            f"y must be a tensor of shape [m={A.shape[0]}], got {list(getattr(y, 'shape', []))}",
        )
        check_finite(A, "A")
        check_finite(y, "the observation y")
        check(
            isinstance(noise_std, (int, float))
            and not isinstance(noise_std, bool)
            and math.isfinite(noise_std)
            and noise_std >= 0,
            f"noise_std must be a finite number >= 0, got {noise_std!r}",
        )
        self.prior, self.dim, self.dtype = prior, d, prior.dtype
        self.noise_std = float(noise_std)
        self.A, self.y = A.to(torch.float64), y.to(torch.float64)
        if self.noise_std > 0:
            w, m, C, self.log_evidence = self._noisy(phi, mu, S)
            self._Vr = self._Vn = self._c = None
        else:
            w, m, C, self.log_evidence = self._noise_free(phi, mu, S)  # m, C: of the free coordinates z
        self.weights = w.to(self.dtype)  # [K], one per prior component
        keep = w > 0  # components whose weight underflows float64 (< 1e-308) drop out
        self.mixture = GaussianMixture(w[keep], m[keep], C[keep], dtype=self.dtype)

    # -- construction ---------------------------------------------------------------------------

    def _noisy(
        self, phi: torch.Tensor, mu: torch.Tensor, S: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        A, y, s2 = self.A, self.y, self.noise_std**2
        first, run = _groups(S)
        Sg = S[first]  # one per covariance group
        M = A @ Sg @ A.T + s2 * torch.eye(len(y), dtype=torch.float64)  # A S A^T + s^2 I
        K = torch.linalg.solve(M, A @ Sg).transpose(1, 2)  # S A^T M^-1 (M symmetric)
        IKA = torch.eye(self.dim, dtype=torch.float64) - K @ A
        C = IKA @ Sg @ IKA.transpose(1, 2) + s2 * K @ K.transpose(1, 2)  # Joseph form: PSD by construction
        C = 0.5 * (C + C.transpose(1, 2))
        r = y - mu @ A.T  # y - A mu_k
        m = mu + torch.einsum("kij,kj->ki", K[run], r)
        logw = phi.log() + _gauss_logpdf(r, M[run])
        log_ev = torch.logsumexp(logw, 0)
        return (logw - log_ev).exp(), m, C[run], float(log_ev)

    def _noise_free(
        self, phi: torch.Tensor, mu: torch.Tensor, S: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        A, y, d = self.A, self.y, self.dim
        U, sv, Vh = torch.linalg.svd(A, full_matrices=True)
        r = int((sv > max(A.shape) * torch.finfo(torch.float64).eps * sv.max()).sum())
        check(
            r < d,
            f"a noise-free A of full column rank ({r} = d) determines x0 exactly; use noise_std > 0 "
            f"or an A with fewer than {d} independent rows",
        )
        Ur, Vr, Vn = U[:, :r], Vh[:r].T, Vh[r:].T
        resid = y - Ur @ (Ur.T @ y)
        check(
            bool(resid.norm() <= 1e-9 * (1 + y.norm())),
            f"noise-free observation y is not in the range of A (|residual| = {float(resid.norm()):.3g}): "
            f"no x0 has A x0 = y; use noise_std > 0",
        )
        c = (Ur.T @ y) / sv[:r]  # V_r^T x0 = c on the subspace
        self._Vr, self._Vn, self._c = Vr, Vn, c
        self._Vr_t, self._Vn_t, self._c_t = Vr.to(self.dtype), Vn.to(self.dtype), c.to(self.dtype)
        self._xc = (Vr @ c).to(self.dtype)  # minimum-norm solution
        first, run = _groups(S)
        Sg = S[first]
        Saa, Sza, Szz = Vr.T @ Sg @ Vr, Vn.T @ Sg @ Vr, Vn.T @ Sg @ Vn
        G = torch.linalg.solve(Saa, Sza.transpose(1, 2)).transpose(1, 2)  # S_za S_aa^-1
        Cz = Szz - G @ Sza.transpose(1, 2)  # Schur complement
        Cz = 0.5 * (Cz + Cz.transpose(1, 2))
        ra = c - mu @ Vr  # c - V_r^T mu_k
        mz = mu @ Vn + torch.einsum("kij,kj->ki", G[run], ra)
        logw = phi.log() + _gauss_logpdf(ra, Saa[run])
        log_ev = torch.logsumexp(logw, 0)
        # density of y on range(A): y = U_r Sigma_r a, so p(y) = p(a = c) / prod(Sigma_r)
        return (logw - log_ev).exp(), mz, Cz[run], float(log_ev - sv[:r].log().sum())

    # -- evaluation -----------------------------------------------------------------------------

    def _prepare(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        check(
            isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] == self.dim,
            f"x must be a tensor of shape [batch, {self.dim}], got {list(getattr(x, 'shape', []))}",
        )
        check_finite(x)
        return as_sigma(sigma, x)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.dtype)
        return _project(x, self._Vr_t), _project(x, self._Vn_t)

    def _on_subspace(self, a: torch.Tensor) -> torch.Tensor:
        tol = (1e-9 if self.dtype == torch.float64 else 1e-4) * (1 + self._c_t.abs().max())
        return (a - self._c_t).abs().amax(1) <= tol

    def logp(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """Exact ``log p(x; sigma | y)``, shape [batch] (noise-free at sigma 0: the subspace density, -inf off it)."""
        sigma = self._prepare(x, sigma)
        if self._Vr is None:
            return self.mixture.logp(x, sigma)
        a, z = self._split(x)
        out = self.mixture.logp(z, sigma.to(self.dtype))
        s = sigma.to(self.dtype)[:, None]
        r = a.shape[1]
        safe = torch.where(s > 0, s, torch.ones_like(s))
        gauss = -0.5 * ((a - self._c_t) / safe).square().sum(1) - r * (safe[:, 0].log() + 0.5 * math.log(2 * math.pi))
        delta = torch.where(self._on_subspace(a), 0.0, -math.inf).to(out)
        return (out + torch.where(s[:, 0] > 0, gauss, delta)).to(x.dtype)

    def score(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """Exact ``grad_x log p(x; sigma | y)``, shape [batch, d] (noise-free at sigma 0: the in-subspace part)."""
        sigma = self._prepare(x, sigma)
        if self._Vr is None:
            return self.mixture.score(x, sigma)
        a, z = self._split(x)
        s2 = sigma.to(self.dtype)[:, None] ** 2
        ga = torch.where(s2 > 0, (self._c_t - a) / torch.where(s2 > 0, s2, torch.ones_like(s2)), 0.0)
        gz = self.mixture.score(z, sigma.to(self.dtype))
        return (_project(ga, self._Vr_t.T) + _project(gz, self._Vn_t.T)).to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor, **cond: Any) -> torch.Tensor:
        """Exact ``E[x0 | x, y]`` (Tweedie), shape [batch, d]; noise-free it lies on ``{A x = y}``."""
        sigma = self._prepare(x, sigma)
        if self._Vr is None:
            return self.mixture.denoise(x, sigma)
        _, z = self._split(x)
        Dz = self.mixture.denoise(z, sigma.to(self.dtype))
        return (self._xc + _project(Dz, self._Vn_t.T)).to(x.dtype)

    __call__ = denoise

    def sample(self, n: int, sigma: float | torch.Tensor = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact posterior samples convolved with ``N(0, sigma^2 I)``, shape [n, d]."""
        if self._Vr is None:
            return self.mixture.sample(n, sigma, generator)
        sigma = as_sigma(sigma, torch.empty(n, 0, dtype=self.dtype))
        z = self.mixture.sample(n, sigma, generator)
        a = self._c_t + sigma[:, None] * torch.randn(n, self._c.shape[0], generator=generator, dtype=self.dtype)
        return _project(a, self._Vr_t.T) + _project(z, self._Vn_t.T)

    def consistency(self, x: torch.Tensor) -> torch.Tensor:
        """Measurement error ``|A x - y|`` per sample, shape [batch] (flattened x)."""
        x = x.flatten(1).to(torch.float64)
        check(x.shape[1] == self.dim, f"x must have {self.dim} values per sample, got {x.shape[1]}")
        return (_project(x, self.A.T) - self.y).norm(dim=1).to(self.dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest point of the posterior's support: noise-free, the orthogonal projection onto
        ``{A x = y}``; noisy, ``x`` itself (full support). Shape [batch, d]."""
        check(
            isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] == self.dim,
            f"x must be a tensor of shape [batch, {self.dim}], got {list(getattr(x, 'shape', []))}",
        )
        if self._Vr is None:
            return x
        a = _project(x.to(self.dtype), self._Vr_t)
        return (x.to(self.dtype) + _project(self._c_t - a, self._Vr_t.T)).to(x.dtype)

    def mean(self) -> torch.Tensor:
        """The posterior mean ``E[x0 | y]`` [d]."""
        if self._Vr is None:
            return self.mixture.mean()
        return self._xc + self._Vn_t @ self.mixture.mean()

    def __repr__(self) -> str:
        return (
            f"linear_posterior(d={self.dim}, m={self.A.shape[0]}, noise_std={self.noise_std:g}, components={len(self.mixture)})"
        )


def linear_posterior(prior: GaussianMixture, A: torch.Tensor, y: torch.Tensor, noise_std: float) -> LinearPosterior:
    """The exact posterior world ``p(x0 | y)`` of ``y = A x0 + noise_std * n`` (n standard normal).

    ``prior``: a toy mixture (``toy.tree("A")``, ``toy.GaussianMixture``, ``toy.digits_gmm()``);
    ``A`` [m, d]; ``y`` [m]; ``noise_std >= 0`` (0: noise-free, e.g. a mask). Evaluated in the prior's dtype.
    """
    return LinearPosterior(prior, A, y, noise_std)


# ---------------------------------------------------------------------------------------------
# An image-sized exact world: one Gaussian per digit class, low rank plus diagonal.


@functools.lru_cache(None)
def _digits_components(rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise GuidelabError("toy.digits_gmm needs scikit-learn (its bundled digits): pip install 'guidelab[data]'") from None
    d = load_digits()
    X = np.asarray(d.images, dtype=np.float64).reshape(-1, 64) / 8.0 - 1.0  # pixels in [-1, 1]
    mu, Sigma = [], []
    for k in range(10):
        Xk = X[d.target == k]
        m = Xk.mean(0)
        lam, V = np.linalg.eigh(np.cov(Xk - m, rowvar=False))
        lam, V = lam[::-1], V[:, ::-1]
        noise = max(lam[rank:].mean(), 1e-3)  # probabilistic PCA (Tipping & Bishop 1999)
        Sigma.append((V[:, :rank] * (lam[:rank] - noise)) @ V[:, :rank].T + noise * np.eye(64))
        mu.append(m)
    phi = np.bincount(d.target, minlength=10).astype(np.float64)
    return phi, np.stack(mu), np.stack(Sigma)


def digits_gmm(rank: int = 8, *, dtype: torch.dtype = torch.float32) -> GaussianMixture:
    """An exact 8x8 image world: 10 Gaussians (one per sklearn digit class), each probabilistic PCA of rank ``rank``.

    Samples are flattened images [n, 64] in [-1, 1] (view them as ``[n, 1, 8, 8]``); component k is class k.
    Built from scikit-learn's bundled digits (no download), deterministically.
    """
    check(isinstance(rank, int) and 0 <= rank < 64, f"rank must be an integer in [0, 64), got {rank!r}")
    phi, mu, Sigma = _digits_components(rank)
    return GaussianMixture(phi, mu, Sigma, dtype=dtype)
