"""Noise schedules: each returns a 1-D tensor of decreasing sigmas followed by a final 0."""

from __future__ import annotations

import torch

from .errors import check


def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s, s.new_zeros(1)])


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    check(isinstance(n, int) and n >= 1, f"number of steps n must be an integer >= 1, got {n!r}")
    check(0 < sigma_min < sigma_max, f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *,
           dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
    """EDM schedule (Karras et al. 2022, eq. 5): ``(smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``.

    Returns n + 1 values: n decreasing sigmas from ``sigma_max`` to ``sigma_min``, then 0.
    """
    _check_range(n, sigma_min, sigma_max)
    check(rho > 0, f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return _append_zero(sigmas).to(dtype=dtype, device=device)
