"""Predictor-corrector guidance (PCG; Bradley & Nakkiran 2024, "Classifier-Free Guidance is a
Predictor-Corrector", arXiv 2408.09000, Alg. 1/2 "PCG_DDIM"): each step is a DDIM predictor step for the
*conditional* distribution, followed by ``K`` Langevin steps on the gamma-powered distribution
``p_gamma(x; sigma) ∝ p(x | c; sigma)^gamma p(x; sigma)^(1 - gamma)``, whose score is the CFG score at
weight gamma: ``(D_gamma - x) / sigma^2`` with ``D_gamma = D_u + gamma (D_c - D_u)`` (this library's ``w``).

Their theorem: in the SDE limit, DDPM with CFG at weight ``w`` equals PCG with one Langevin step of size
``eps = sigma^2 - sigma_next^2`` on ``p_gamma`` with ``gamma = 2 w - 1`` (DDPM = DDIM + one such Langevin
step; the drifts add up). So with the defaults (``corrector_steps=1``, ``step_scale=1``), ``pcg`` at
``gamma = 2 w - 1`` is CFG-DDPM at ``w`` up to discretisation, and more corrector steps move the samples
towards ``p_gamma`` itself (which neither CFG-DDIM nor CFG-DDPM samples).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Protocol, cast

import torch

from ..denoisers import Guider
from ..errors import GuidelabError, check
from .base import Callback, begin_run, check_inputs, evaluator, report, resolve_noise


class _Linear(Protocol):
    """A linear guider as pcg reads it (``guidance.Guided``): its two branches at (x, sigma)."""

    def branches(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]: ...


def _at_weight(denoiser: _Linear, weight: float) -> Callable[..., torch.Tensor]:
    """``D_ref + weight (D_main - D_ref)`` of a linear guider, both branches in its one batched call."""

    def combined(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        D, D_ref = denoiser.branches(x, sigma, cond)
        return D_ref.lerp(D, weight)

    return combined


@torch.no_grad()
def pcg(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    gamma: float | None = None,
    corrector_steps: int = 1,
    step_scale: float = 1.0,
    predictor_weight: float = 1.0,
    noise: object = None,
) -> torch.Tensor:
    """PCG_DDIM: DDIM predictor sigma -> sigma_next, then ``corrector_steps`` Langevin steps at sigma_next
    ``x <- x + (eps / 2) (D_gamma - x) / sigma_next^2 + sqrt(eps) n``, ``eps = step_scale (sigma^2 - sigma_next^2)``.

    ``denoiser``: a linear guider (``guidance.cfg``, ...) or a plain denoiser. ``gamma``: the corrector's
    power; default the guider's own weight (the guided denoiser is the corrector's). ``predictor_weight``:
    the predictor's guidance weight, default 1 (the guider's main branch: the conditional, as the paper).
    A weight other than the guider's needs a linear guider (its two branches are recombined). No corrector
    on the step to sigma = 0 (which returns the predictor's D). NFE per step: 1 + corrector_steps x the
    guider's. ``corrector_steps=0`` is DDIM on the predictor's denoiser, bit for bit.
    """
    check(
        isinstance(corrector_steps, int) and corrector_steps >= 0,
        f"corrector_steps must be an integer >= 0, got {corrector_steps!r}",
    )
    check(step_scale > 0, f"step_scale must be > 0, got {step_scale}")
    sigmas = check_inputs(x, sigmas)
    linear = isinstance(denoiser, Guider) and hasattr(denoiser, "branches") and getattr(denoiser, "rule", None) is None
    for name, value in (("gamma", gamma), ("predictor_weight", predictor_weight if predictor_weight != 1 else None)):
        if value is not None and not linear:
            raise GuidelabError(
                f"pcg with {name}={value} recombines the two branches of a linear guider (cfg, autoguidance, icg, "
                f"tsg); got {getattr(denoiser, 'name', type(denoiser).__name__)}"
            )
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "pcg")
    noise = resolve_noise(noise, x, sigmas) if corrector_steps else None
    if predictor_weight != 1:
        predict = evaluator(_at_weight(cast(_Linear, denoiser), predictor_weight), x, cond, run)  # linear: checked above
    else:
        predict = evaluator(denoiser.unguided if isinstance(denoiser, Guider) else denoiser, x, cond, run)
    target = evaluator(_at_weight(cast(_Linear, denoiser), gamma) if gamma is not None else denoiser, x, cond, run)
    sig = sigmas.tolist()
    for i in run.steps(progress, "pcg"):
        sigma, sigma_next = sig[i], sig[i + 1]
        D = predict(x, sigma)
        report(callback, x, i, sigmas, sigma, D)
        x = torch.lerp(D, x, sigma_next / sigma)  # DDIM: D + (sigma_next / sigma)(x - D)
        if sigma_next == 0:
            break
        eps = step_scale * (sigma**2 - sigma_next**2)
        for _ in range(corrector_steps):
            assert noise is not None
            x = torch.lerp(x, target(x, sigma_next), 0.5 * eps / sigma_next**2)  # x + (eps/2) score
            x = x + noise(sigma, sigma_next) * math.sqrt(eps)
    return x
