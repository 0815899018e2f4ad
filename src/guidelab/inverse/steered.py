"""Steered Diffusion (Nair et al., ICCV 2023, arXiv 2310.00224): plug-and-play conditioning by steering the
denoiser's clean-image estimate, then a DDIM step from the steered estimate.

Per step (as the official ``conditional_sample``, merlresearch/SteeredDiffusion, in sigma space)::

    x0_hat  = D(x)
    x0_hat' = x0_hat - scale sigma grad_x L(x0_hat(x))          mode="gradient" (any differentiable loss)
    x0_hat' = x0_hat - P x0_hat + A^+ y                         mode="projection" (linear operators)
    x_next  = DDIM(eta) step from (x, x0_hat')                  (eps recomputed from x0_hat', eta = 1)

repeated ``n_iter`` times per step, re-noising ``x_next`` back to sigma between repetitions (their
looping mechanism). ``L`` defaults to the measurement loss ``|y - A(x0)|^2``. The official code uses the
closed-form projection for inpainting, super-resolution and colourisation and the gradient form for
network losses (identity, semantics, text); its gradient factor is ``sqrt(1 - abar_{t+1})`` on the VP
gradient, ``sigma`` here (one-step offset removed); its re-noising multiplies the noise by ``beta_t``
instead of ``sqrt(beta_t)`` (here the exact ``sqrt(sigma^2 - sigma_next^2)``); defaults there: 100
respaced steps, ``num_iters = 1``. The paper's own text was not available to us: this follows the code.

NFE: ``n_iter`` per step (plus a backward pass through the denoiser in gradient mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import GuidelabError, check
from ..samplers.base import (
    Callback,
    ancestral_step,
    begin_run,
    check_inputs,
    euler_step,
    report,
    resolve_noise,
)
from ..samplers.edm import Noise
from ._common import check_int, check_number, lift, through_denoiser
from .dps import _measurement
from .operators import Operator, need_projection


def measurement_loss(A: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x0 -> |y - A(x0)|^2`` per sample [B]."""

    def loss(x0: torch.Tensor) -> torch.Tensor:
        return (y - A(x0)).reshape(x0.shape[0], -1).square().sum(1)

    return loss


@torch.no_grad()
def steered(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    operator: Operator | Callable[[torch.Tensor], torch.Tensor] | None = None,
    y: torch.Tensor | None = None,
    *,
    mode: str = "gradient",
    scale: float = 1.0,
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    n_iter: int = 1,
    eta: float = 1.0,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    noise: Noise = None,
) -> torch.Tensor:
    """Steered Diffusion from ``x`` at ``sigmas[0]``.

    ``mode="gradient"``: steer by ``loss(x0) -> [B]`` (default ``|y - operator(x0)|^2``; ``operator`` may
    be any differentiable callable, or omitted when ``loss`` is given); ``mode="projection"``: replace the
    row-space part of the estimate by ``A^+ y`` (projection operators only; ``scale`` unused).
    """
    sigmas = check_inputs(x, sigmas)
    check(mode in ("gradient", "projection"), f"unknown steered mode {mode!r}; allowed: 'gradient', 'projection'")
    check_number(scale, "scale")
    check_number(eta, "eta")
    check_int(n_iter, "n_iter", 1)
    if mode == "projection":
        op = need_projection(operator, "steered mode='projection'")
        if y is None:
            raise GuidelabError("steered mode='projection' needs y, the observation operator(x0)")
        op, y = _measurement(op, y, x)
        y_lift = lift(op, y, x)
    elif loss is None:
        if operator is None or y is None:
            raise GuidelabError("steered needs an operator and y, or a loss")
        A, y = _measurement(operator, y, x)
        loss = measurement_loss(A, y)
    else:
        check(callable(loss), "loss must be a callable loss(x0) -> [batch]")
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "steered", frozenset())
    noise = resolve_noise(noise, x, sigmas)
    sig, batch, cond = sigmas.tolist(), x.shape[0], cond or {}
    for i in run.steps(progress, "steered"):
        sigma, sigma_next = sig[i], sig[i + 1]
        s = torch.full((batch,), sigma, dtype=x.dtype, device=x.device)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        for r in range(n_iter):
            if mode == "projection":
                D = denoiser(x, s, **cond)
                x0 = D - op.project(D) + y_lift
            else:
                assert loss is not None  # set above in gradient mode
                D, g = through_denoiser(denoiser, x, s, cond, loss)
                x0 = D - (scale * sigma) * g
            if r == 0:
                report(callback, x, i, sigmas, sigma, D)
            x_next = euler_step(None, x, x0, sigma, sigma_down)  # DDIM from the steered estimate
            if sigma_next > 0 and sigma_up > 0:
                x_next = x_next + sigma_up * noise(sigma, sigma_next)
            if r < n_iter - 1:  # loop: re-noise to sigma
                x = x_next + math.sqrt(sigma**2 - sigma_next**2) * noise(sigma, sigma_next)
        x = x_next
    return x
