"""The EDM samplers (Karras et al. 2022, Algorithm 2): Euler and Heun with optional churn."""

from __future__ import annotations

import math

import torch

from ._common import Callback, check_inputs, churn, denoise, resolve_noise, steps


def _edm(denoiser, x, sigmas, *, second_order, cond, callback, progress, s_churn, s_tmin, s_tmax, s_noise, noise):
    sigmas = check_inputs(x, sigmas)
    noise = resolve_noise(noise, x) if s_churn > 0 else None
    n = len(sigmas) - 1
    for i in steps(sigmas, progress, "heun" if second_order else "euler"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, sigma_hat = churn(x, sigma, n, noise, sigma_next, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
        D = denoise(denoiser, x, sigma_hat, cond)
        d = (x - D) / sigma_hat                                    # eq. 3: dx/dsigma = (x - D) / sigma
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": D})
        x_next = x + (sigma_next - sigma_hat) * d                  # Alg. 2 line 8 (Euler step)
        if second_order and sigma_next > 0:                        # Alg. 2 lines 9-11 (2nd-order correction)
            d_next = (x_next - denoise(denoiser, x_next, sigma_next, cond)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


def euler(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict | None = None,
          callback: Callback | None = None, progress: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = math.inf, s_noise: float = 1.0, noise=None) -> torch.Tensor:
    """Euler on the probability-flow ODE (1 NFE per step), with EDM churn when ``s_churn > 0``.

    ``x`` is the starting sample at ``sigmas[0]`` (noise already scaled); ``cond`` is passed to the
    denoiser as keyword arguments; ``noise`` is a ``SampleNoise`` (per-sample seeds) or a noise sampler.
    """
    return _edm(denoiser, x, sigmas, second_order=False, cond=cond, callback=callback, progress=progress,
                s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, noise=noise)


def heun(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict | None = None,
         callback: Callback | None = None, progress: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = math.inf, s_noise: float = 1.0, noise=None) -> torch.Tensor:
    """The EDM sampler (Algorithm 2): Heun's 2nd-order method, Euler on the last step to sigma = 0.

    2 NFE per step except the last; arguments as in :func:`euler`.
    """
    return _edm(denoiser, x, sigmas, second_order=True, cond=cond, callback=callback, progress=progress,
                s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, noise=noise)
