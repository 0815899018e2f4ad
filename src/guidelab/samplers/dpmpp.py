"""DPM-Solver++ (Lu et al. 2022b, arXiv 2211.01095): exponential integrators on the data prediction D.

In EDM coordinates with ``lambda = -log sigma`` and ``h = lambda_next - lambda`` the exact solution of
the PF-ODE is ``x_next = (sigma_next / sigma) x + sigma_next int e^lambda D dlambda`` (their eq. 9);
the solvers below approximate D over the step by polynomials in lambda. Stochastic variants follow
k-diffusion's SDE forms (eta = 0 gives the ODE solver back).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import check
from .base import Callback, ancestral_loop, begin_run, check_inputs, dpmpp_2s_step, pair_evaluator, report, resolve_noise, shifted


def dpmpp_2s_ancestral(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise: object = None,
) -> torch.Tensor:
    """DPM-Solver++(2S) single-step to sigma_down, then ancestral noise (2 NFE per step, 1 on the last).

    With CFG++ (``guidance.cfgpp``, the renoise step) as ComfyUI's ``sample_dpmpp_2s_ancestral_cfg_pp``:
    both sub-steps start from ``x + (D_lam - D_u)`` with data terms ``D_lam`` (at sigma) and the guided
    midpoint ``D_lam(x_mid)``, so ``x_mid = D_lam + (s_mid / sigma)(x - D_u)``.
    """
    return ancestral_loop(
        denoiser,
        x,
        sigmas,
        dpmpp_2s_step,
        name="dpmpp_2s_ancestral",
        cond=cond,
        callback=callback,
        progress=progress,
        eta=eta,
        s_noise=s_noise,
        noise=noise,
    )


@torch.no_grad()
def _multistep(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    name: str,
    order: int,
    eta: float,
    s_noise: float,
    noise: object,
    solver_type: str,
    cond: dict | None,
    callback: Callback | None,
    progress: bool,
) -> torch.Tensor:
    """DPM-Solver++(kM) with SDE noise ``eta`` (k = order <= 3, lower order while the history fills up).

    Step (their Alg. 2 / k-diffusion's SDE form), ``h_eta = (1 + eta) h``:
      ``x_next = (sigma_next / sigma) e^{-eta h} x + (1 - e^{-h_eta}) D + corrections
               + sigma_next sqrt(1 - e^{-2 eta h}) n``;
    the step to sigma = 0 returns D.
    """
    sigmas = check_inputs(x, sigmas)
    check(eta >= 0, f"eta must be >= 0, got {eta}")
    denoiser, run = begin_run(denoiser, x, sigmas, noise, name)
    noise = resolve_noise(noise, x, sigmas) if eta > 0 else None
    # CFG++ (where name supports it: 2M): data term from D = D_lam, the e^{-h} and history terms from D_r = D_u.
    evaluate_pair = pair_evaluator(denoiser, x, cond, run)
    sig = sigmas.tolist()
    # history: previous D, D_1 - D_2, step sizes
    D_1: torch.Tensor | None = None
    delta_1: torch.Tensor | None = None
    h_1: float | None = None
    h_2: float | None = None
    for i in run.steps(progress, name):
        sigma, sigma_next = sig[i], sig[i + 1]
        D, D_r = evaluate_pair(x, sigma)
        report(callback, x, i, sigmas, sigma, D)
        if sigma_next == 0:
            x = D  # first-order step to sigma = 0
            break
        h = math.log(sigma) - math.log(sigma_next)
        h_eta = h * (1 + eta)
        phi_1 = -math.expm1(-h_eta)  # 1 - e^{-h_eta}; (sigma_next/sigma) e^{-eta h} = 1 - phi_1
        x = torch.lerp(D, shifted(x, D, D_r), 1 - phi_1)  # first order: (1 - phi_1) x + phi_1 D
        delta: torch.Tensor | None = None if D_1 is None else D - D_1
        phi_2 = -phi_1 / h_eta + 1
        if order >= 3 and h_2 is not None:  # 3rd order from 2nd divided differences:
            assert h_1 is not None and delta is not None and delta_1 is not None  # set since two steps
            r0, r1 = h_1 / h, h_2 / h  # phi_2 d1 - phi_3 d2 with d1_0 = delta / r0,
            phi_3 = phi_2 / h_eta - 0.5  # d1_1 = delta_1 / r1, d2 = (d1_0 - d1_1)/(r0 + r1),
            c2 = phi_2 * r0 / (r0 + r1) - phi_3 / (r0 + r1)  # d1 = d1_0 + r0 d2
            x.add_(delta, alpha=(phi_2 + c2) / r0).add_(delta_1, alpha=-c2 / r1)
        elif delta is not None:  # 2nd order from one previous D
            assert h_1 is not None  # set with D_1
            r = h_1 / h
            x.add_(delta, alpha=(0.5 * phi_1 if solver_type == "midpoint" else phi_2) / r)
        if eta > 0:
            assert noise is not None
            x.add_(noise(sigma, sigma_next), alpha=sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
        D_1, delta_1, h_1, h_2 = D_r, delta, h, h_1
    return x


def dpmpp_2m(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    noise: object = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): 2nd-order multistep (1 NFE per step), first order on the first and last steps.

    Deterministic: ``noise`` is accepted (one signature for all samplers) and not used.
    """
    return _multistep(
        denoiser,
        x,
        sigmas,
        name="dpmpp_2m",
        order=2,
        eta=0.0,
        s_noise=1.0,
        noise=None,
        solver_type="midpoint",
        cond=cond,
        callback=callback,
        progress=progress,
    )


def dpmpp_2m_sde(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    noise: object = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (1 NFE per step); ``solver_type`` "midpoint" or "heun"; ``eta = 0`` is ``dpmpp_2m``.

    ``noise``: a ``BrownianNoise`` keeps a run consistent when its schedule is refined.
    """
    check(solver_type in ("midpoint", "heun"), f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    return _multistep(
        denoiser,
        x,
        sigmas,
        name="dpmpp_2m_sde",
        order=2,
        eta=eta,
        s_noise=s_noise,
        noise=noise,
        solver_type=solver_type,
        cond=cond,
        callback=callback,
        progress=progress,
    )


def dpmpp_3m_sde(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise: object = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (1 NFE per step); ``eta = 0`` is the 3rd-order multistep ODE solver."""
    return _multistep(
        denoiser,
        x,
        sigmas,
        name="dpmpp_3m_sde",
        order=3,
        eta=eta,
        s_noise=s_noise,
        noise=noise,
        solver_type="heun",
        cond=cond,
        callback=callback,
        progress=progress,
    )
