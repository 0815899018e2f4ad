"""Fréchet distance between Gaussians fitted to features (FID, FD-DINOv2) and streaming feature statistics.

``d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))`` (Dowson & Landau 1982; Heusel
et al. 2017, Eq. 6). ``tr((S_1 S_2)^(1/2))`` is the sum of the square roots of the eigenvalues of
``S_1 S_2``, which are those of the *symmetric* ``S_1^(1/2) S_2 S_1^(1/2)``: two ``eigh`` calls replace
scipy's general (Schur-based, complex) ``sqrtm`` used by pytorch-fid and clean-fid. With the
Cholesky factor ``S_1 = R R^T`` in place of ``S_1^(1/2)`` (same eigenvalues) only eigenvalues are needed.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..errors import check


def _as_f64(a: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    check(isinstance(a, torch.Tensor), f"{name} must be a numpy array or a torch tensor, got {type(a).__name__}")
    a = a.detach().to("cpu", torch.float64)
    check(bool(torch.isfinite(a).all()), f"{name} contains NaN or inf values")
    return a


def _sqrt_psd(S: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    L, Q = np.linalg.eigh(S)
    return (Q * np.sqrt(np.clip(L, 0, None))) @ Q.T


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); numpy or torch inputs.

    mu: [D], sigma: [D, D] symmetric PSD. Computed in float64 on the CPU.
    """
    mu1, mu2 = _as_f64(mu1, "mu1"), _as_f64(mu2, "mu2")
    S1, S2 = _as_f64(sigma1, "sigma1"), _as_f64(sigma2, "sigma2")
    D = mu1.shape[0] if mu1.ndim == 1 else -1
    check(
        mu1.ndim == 1 and mu2.shape == mu1.shape,
        f"mu1 and mu2 must both have shape [D], got {list(mu1.shape)} and {list(mu2.shape)}",
    )
    check(
        S1.shape == (D, D) and S2.shape == (D, D),
        f"sigma1 and sigma2 must have shape [{D}, {D}], got {list(S1.shape)} and {list(S2.shape)}",
    )
    m1, m2, C1, C2 = (t.numpy() for t in (mu1, mu2, S1, S2))
    C1, C2 = (C1 + C1.T) / 2, (C2 + C2.T) / 2
    return float(np.square(m1 - m2).sum() + np.trace(C1) + np.trace(C2) - 2 * _trace_sqrt_product(C1, C2))


def _trace_sqrt_product(S1: np.ndarray, S2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i), lambda the eigenvalues of S1 S2, taken from a symmetric
    matrix similar to S1 S2: R^T S2 R with S1 = R R^T. R is the Cholesky factor when S1 is positive
    definite (eigenvalues only, no eigenvectors: fastest), else S1^(1/2) from ``eigh``.
    (torch's CPU Cholesky and ``eigvalsh`` were the fastest here, numpy's ``eigh`` with vectors.)"""
    T1, T2 = torch.from_numpy(S1), torch.from_numpy(S2)
    R, info = torch.linalg.cholesky_ex(T1)
    if info.item() != 0:  # singular S1 (e.g. fewer samples than dimensions)
        R = torch.from_numpy(_sqrt_psd(S1))
    M = R.T @ T2 @ R
    return torch.linalg.eigvalsh((M + M.T) / 2).clamp_min(0).sqrt().sum().item()


class FeatureStats:
    """Running sums of features for a Gaussian fit: count, sum [D], sum of outer products [D, D].

    Memory is O(D^2) whatever the sample count; stats of shards or processes merge exactly by
    adding their sums (:meth:`merge`, ``+``, :meth:`all_reduce`). Sums are kept in float64.
    """

    def __init__(self, dim: int):
        check(isinstance(dim, int) and dim > 0, f"dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: np.ndarray | torch.Tensor) -> "FeatureStats":
        """Add a batch of features [N, D]."""
        f = _as_f64(features, "features")
        check(f.ndim == 2 and f.shape[1] == self.dim, f"features must have shape [N, {self.dim}], got {list(f.shape)}")
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add the sums of ``other`` (another shard) into these stats."""
        check(isinstance(other, FeatureStats) and other.dim == self.dim, "can only merge FeatureStats of the same dim")
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        return self

    def __add__(self, other: "FeatureStats") -> "FeatureStats":
        return FeatureStats(self.dim).merge(self).merge(other)

    def all_reduce(self) -> "FeatureStats":
        """Sum the stats over all processes of the default ``torch.distributed`` group (in place)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
            flat = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.sum, self.outer.flatten()]).to(dev)
            dist.all_reduce(flat)
            flat = flat.cpu()
            self.count = int(round(flat[0].item()))
            self.sum = flat[1 : 1 + self.dim].clone()
            self.outer = flat[1 + self.dim :].view(self.dim, self.dim).clone()
        return self

    @property
    def mean(self) -> torch.Tensor:
        check(self.count > 0, "FeatureStats is empty")
        return self.sum / self.count

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased covariance (divides by N - 1, as ``np.cov``)."""
        check(self.count > 1, "FeatureStats needs at least 2 samples for a covariance")
        mu = self.mean
        return (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays to save (e.g. with ``np.savez``); :meth:`from_state_dict` reads them back."""
        return {"count": np.array(self.count), "sum": self.sum.numpy(), "outer": self.outer.numpy()}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> "FeatureStats":
        s = cls(int(np.asarray(d["sum"]).shape[0]))
        s.count, s.sum = int(d["count"]), torch.as_tensor(np.asarray(d["sum"]), dtype=torch.float64).clone()
        s.outer = torch.as_tensor(np.asarray(d["outer"]), dtype=torch.float64).clone()
        return s


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between the Gaussians fitted by two :class:`FeatureStats`."""
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)
