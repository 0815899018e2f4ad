"""Noise schedules: each returns a 1-D tensor of decreasing sigmas followed by a final 0.

Continuous schedules take ``n`` (number of steps) and return ``n + 1`` values. Discrete-time models
(DDPM-style, trained on ``T`` timesteps) use :func:`vp_grid` for the sigma of every training
timestep, :func:`discrete` for the usual timestep spacings and :func:`snap` / :func:`timesteps` to
put any schedule on the grid. Sigma is the EDM noise level: a VP model's ``alpha_bar`` maps to
``sigma = sqrt((1 - alpha_bar) / alpha_bar)``.
"""

from __future__ import annotations

import math

import torch

from .errors import GuidelabError, check

_F64 = torch.float64


def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s, s.new_zeros(1)])


def _check_n(n: int) -> None:
    check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, f"number of steps n must be an integer >= 1, got {n!r}")


#: The largest sigma_max a schedule takes: x_T = sigma_max * N(0, I) must stay far inside float32 (3.4e38),
#: and squared (sigma^2 + sigma_data^2 in the EDM preconditioning) too.
SIGMA_LIMIT = 1e6


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    _check_n(n)
    check(
        all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (sigma_min, sigma_max)),
        f"sigma_min and sigma_max must be finite numbers, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}",
    )
    check(
        0 < sigma_min < sigma_max <= SIGMA_LIMIT,
        f"need 0 < sigma_min < sigma_max <= {SIGMA_LIMIT:g}, got sigma_min={sigma_min}, sigma_max={sigma_max}",
    )


def _ramp(n: int) -> torch.Tensor:
    """``i / (n - 1)`` for i = 0..n-1 (a single 0 when n = 1), float64."""
    return torch.linspace(0, 1, n, dtype=_F64) if n > 1 else torch.zeros(1, dtype=_F64)


def _out(sigmas: torch.Tensor, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    return _append_zero(sigmas).to(dtype=dtype, device=device)


def karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *, dtype: torch.dtype = _F64, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """EDM schedule (Karras et al. 2022, eq. 5): ``(smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``.

    Returns n + 1 values: n decreasing sigmas from ``sigma_max`` to ``sigma_min``, then 0.
    """
    _check_range(n, sigma_min, sigma_max)
    check(rho > 0, f"rho must be > 0, got {rho}")
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _out((hi + _ramp(n) * (lo - hi)) ** rho, dtype, device)


def exponential(
    n: int, sigma_min: float, sigma_max: float, *, dtype: torch.dtype = _F64, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Uniform in ``log sigma`` (hence uniform in log-SNR ``= -2 log sigma``) from sigma_max to sigma_min, then 0."""
    _check_range(n, sigma_min, sigma_max)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return _out((hi + _ramp(n) * (lo - hi)).exp(), dtype, device)


def polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, *, dtype: torch.dtype = _F64, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``log sigma_i = log smin + (1 - i/(n-1))^rho (log smax - log smin)``; rho = 1 is :func:`exponential`."""
    _check_range(n, sigma_min, sigma_max)
    check(rho > 0, f"rho must be > 0, got {rho}")
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return _out((lo + (1 - _ramp(n)) ** rho * (hi - lo)).exp(), dtype, device)


def logsnr(
    n: int, logsnr_min: float, logsnr_max: float, *, dtype: torch.dtype = _F64, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Uniform in log-SNR ``lambda = log(alpha^2 / sigma_VP^2) = -2 log sigma`` from logsnr_min to logsnr_max.

    The same grid as :func:`exponential` (DPM-Solver's "logSNR" time steps), given by its log-SNR ends.
    """
    check(logsnr_min < logsnr_max, f"need logsnr_min < logsnr_max, got {logsnr_min}, {logsnr_max}")
    return exponential(n, math.exp(-logsnr_max / 2), math.exp(-logsnr_min / 2), dtype=dtype, device=device)


def vp(
    n: int,
    beta_d: float = 19.9,
    beta_min: float = 0.1,
    eps_s: float = 1e-3,
    *,
    dtype: torch.dtype = _F64,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Continuous VP schedule with linear beta (Song et al. 2021; EDM Table 1), t uniform from 1 to eps_s.

    ``alpha_bar(t) = exp(-beta_d t^2 / 2 - beta_min t)`` so ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``.
    """
    _check_n(n)
    check(
        beta_d > 0 and beta_min >= 0 and 0 < eps_s < 1,
        f"need beta_d > 0, beta_min >= 0, 0 < eps_s < 1, got {beta_d}, {beta_min}, {eps_s}",
    )
    t = 1 + _ramp(n) * (eps_s - 1)
    return _out(torch.expm1(beta_d * t**2 / 2 + beta_min * t).sqrt(), dtype, device)


def cosine(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    s: float = 0.008,
    *,
    dtype: torch.dtype = _F64,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17), t uniform between the times of sigma_max and sigma_min.

    ``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos^2((t + s) / (1 + s) pi / 2)``; its sigma is infinite at
    t = 1, so the grid is cut at ``sigma_max``.
    """
    _check_range(n, sigma_min, sigma_max)
    check(s > 0, f"s must be > 0, got {s}")
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2

    def t_of(sigma: float) -> float:  # inverse of sigma(t) = sqrt(f(0) / f(t) - 1)
        return (1 + s) * 2 / math.pi * math.acos(math.sqrt(f0 / (1 + sigma**2))) - s

    t = t_of(sigma_max) + _ramp(n) * (t_of(sigma_min) - t_of(sigma_max))
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return _out((f0 / f - 1).sqrt(), dtype, device)


# ---------------------------------------------------------------------------------------------
# Discrete time (DDPM-style models trained on T timesteps).


def vp_grid(
    T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, kind: str = "linear", *, dtype: torch.dtype = _F64
) -> torch.Tensor:
    """Sigma of every training timestep t = 0..T-1 of a discrete VP model, shape [T], increasing.

    ``kind``: "linear" (DDPM: beta linear in t), "scaled_linear" (Stable Diffusion: sqrt(beta) linear)
    or "cosine" (Nichol & Dhariwal, betas clipped at 0.999). ``sigma_t = sqrt((1 - abar_t) / abar_t)``.
    """
    _check_n(T)
    if kind == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=_F64)
    elif kind == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=_F64) ** 2
    elif kind == "cosine":
        a = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - a((i + 1) / T) / a(i / T), 0.999) for i in range(T)], dtype=_F64)
    else:
        raise GuidelabError(f"unknown beta schedule kind {kind!r}; allowed: 'linear', 'scaled_linear', 'cosine'")
    check(bool(((betas > 0) & (betas < 1)).all()), f"betas must lie in (0, 1), got [{betas.min():g}, {betas.max():g}]")
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt().to(dtype)


def _check_grid(grid: torch.Tensor) -> torch.Tensor:
    grid = torch.as_tensor(grid)
    check(
        grid.ndim == 1 and grid.numel() >= 2 and bool((grid[1:] > grid[:-1]).all()) and bool(grid[0] > 0),
        "grid must be a 1-D tensor of increasing positive sigmas (one per training timestep), e.g. vp_grid()",
    )
    return grid


def discrete(n: int, grid: torch.Tensor, spacing: str = "leading", offset: int = 0) -> torch.Tensor:
    """``n`` sigmas of ``grid`` picked by timestep (Lin et al. 2023, Table 2), then 0.

    ``spacing``: "leading" (``t = i * (T // n) + offset``, DDIM/DDPM default), "trailing"
    (``t = round(T - i T / n) - 1``) or "linspace" (``round(linspace(0, T - 1, n))``).
    """
    grid = _check_grid(grid)
    T = grid.numel()
    _check_n(n)
    check(n <= T, f"n = {n} steps is more than the grid's {T} timesteps")
    if spacing == "leading":
        check(0 <= offset and (n - 1) * (T // n) + offset < T, f"offset {offset} puts timesteps outside 0..{T - 1}")
        t = torch.arange(n) * (T // n) + offset
    elif spacing == "trailing":
        t = (torch.arange(T, 0, -T / n, dtype=_F64).round() - 1).long().flip(0)
    elif spacing == "linspace":
        t = torch.linspace(0, T - 1, n, dtype=_F64).round().long()
    else:
        raise GuidelabError(f"unknown spacing {spacing!r}; allowed: 'leading', 'trailing', 'linspace'")
    return _append_zero(grid[t.flip(0)])


def timesteps(sigmas: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the grid entry nearest (in log sigma) to each nonzero sigma, shape [len(nonzero)]."""
    grid = _check_grid(grid)
    s = torch.as_tensor(sigmas, dtype=grid.dtype)
    s = s[s > 0]
    return (s.log()[:, None] - grid.log()[None, :]).abs().argmin(1)


def snap(sigmas: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Move every nonzero sigma to the nearest grid sigma (in log sigma); keep the final 0.

    Sigmas that land on the same timestep are merged, so the result can be shorter than the input.
    """
    grid = _check_grid(grid)
    sigmas = torch.as_tensor(sigmas)
    check(sigmas.ndim == 1 and sigmas.numel() >= 2 and float(sigmas[-1]) == 0, "sigmas must be a 1-D schedule ending in 0")
    t = torch.unique_consecutive(timesteps(sigmas, grid))
    return _append_zero(grid[t]).to(sigmas.dtype)
