"""Pieces every sampler shares, written once: input checks, the denoiser call, noise, churn, progress."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch

from ..errors import GuidelabError, check
from ..rng import NoiseSampler, SampleNoise, global_noise

Callback = Callable[[dict[str, Any]], None]


def check_inputs(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Validate a sampler's ``x`` and ``sigmas``; return sigmas in x's dtype and device."""
    check(isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] >= 1,
          f"x must be a tensor of shape [batch, ...], got {type(x).__name__} {getattr(x, 'shape', '')}")
    sigmas = torch.as_tensor(sigmas)
    check(sigmas.ndim == 1 and sigmas.numel() >= 2,
          f"sigmas must be a 1-D tensor of at least 2 values (n steps + final 0), got shape {list(sigmas.shape)}")
    check(bool(torch.isfinite(sigmas).all()), "sigmas must be finite")
    check(float(sigmas[-1]) == 0.0, f"sigmas must end in 0, got last value {float(sigmas[-1]):g}")
    check(bool((sigmas[1:] < sigmas[:-1]).all()), "sigmas must be strictly decreasing")
    check(bool(torch.isfinite(x).all()), "x (the starting sample) contains NaN or inf values")
    return sigmas.to(dtype=x.dtype, device=x.device)


def resolve_noise(noise: NoiseSampler | SampleNoise | None, x: torch.Tensor) -> NoiseSampler:
    """``None`` -> torch's global generator; a ``SampleNoise`` -> per-sample; else a noise sampler."""
    if noise is None:
        return global_noise(x)
    if isinstance(noise, SampleNoise):
        return noise.sampler(x)
    if not callable(noise):
        raise GuidelabError(f"noise must be None, a SampleNoise or a callable (sigma, sigma_next) -> tensor, got {type(noise).__name__}")
    return noise


def denoise(denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None) -> torch.Tensor:
    """Call ``denoiser`` with a scalar step sigma broadcast to the per-sample [batch] shape."""
    return denoiser(x, sigma.expand(x.shape[0]), **(cond or {}))


def steps(sigmas: torch.Tensor, progress: bool, desc: str) -> Iterator[int]:
    n = len(sigmas) - 1
    if progress:
        from tqdm.auto import trange
        return iter(trange(n, desc=desc, leave=False))
    return iter(range(n))


def churn(x: torch.Tensor, sigma: torch.Tensor, n_steps: int, noise: NoiseSampler, sigma_next: torch.Tensor, *,
          s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM Algorithm 2, lines 4-6: raise the noise level to sigma_hat = (1 + gamma) sigma, adding fresh noise."""
    gamma = min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    return x + (sigma_hat ** 2 - sigma ** 2).sqrt() * s_noise * noise(sigma, sigma_next), sigma_hat
