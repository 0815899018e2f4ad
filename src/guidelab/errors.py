"""Input checks shared by the whole package: each failure is one clear line."""

from __future__ import annotations

import math

import torch


class GuidelabError(ValueError):
    """A user mistake: the message says what was wrong and what is allowed."""


class NonFiniteError(GuidelabError):
    """A denoiser returned NaN or inf inside a sampler loop (names the sampler, step, sigma and rows)."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise GuidelabError(message)


def as_sigma(sigma: float | torch.Tensor, x: torch.Tensor, *, name: str = "sigma") -> torch.Tensor:
    """Return ``sigma`` as a tensor of shape [batch] matching ``x`` (a scalar is broadcast).

    Raises a one-line error for a wrong shape, a negative or a non-finite value.
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    check(
        sigma.shape == (x.shape[0],),
        f"{name} must be a scalar or a tensor of shape [batch]=[{x.shape[0]}], got shape {list(sigma.shape)}",
    )
    check(bool(torch.isfinite(sigma).all()), f"{name} must be finite, got {sigma.tolist()[:4]}...")
    check(bool((sigma >= 0).all()), f"{name} must be >= 0, got min {sigma.min().item():g}")
    return sigma


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    check(bool(torch.isfinite(x).all()), f"{name} contains NaN or inf values")


def check_weight(w: float | torch.Tensor, name: str = "w") -> None:
    if isinstance(w, torch.Tensor):
        check(bool(torch.isfinite(w).all()), f"guidance weight {name} must be finite")
    else:
        check(
            isinstance(w, (int, float)) and math.isfinite(w),
            f"guidance weight {name} must be a finite number or tensor, got {w!r}",
        )
