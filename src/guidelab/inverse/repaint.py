"""RePaint (Lugmayr et al., CVPR 2022, arXiv 2201.09865, Alg. 1): inpainting with an unconditional denoiser.

Each reverse step (their eq. 8), written in sigma space (``x = x0 + sigma n``)::

    x_known   = y + sigma_next n                    (the observation forward-noised, eq. 8 top)
    x_unknown = DDPM step of x from sigma to sigma_next (eq. 8 middle; ancestral, eta = 1)
    x         = m * x_known + (1 - m) * x_unknown   (eq. 8 bottom)

and *resampling*: the time schedule jumps back ``jump_length`` steps ``jump_n_sample - 1`` times at
every ``jump_length``-th step (their Sec. 4.2 / ``get_schedule_jump``; paper defaults 250 steps,
``jump_length = 10``, ``jump_n_sample = 10``), re-noising ``x`` from sigma to the higher sigma' with
``x + sqrt(sigma'^2 - sigma^2) n`` (the VP ``sqrt(1 - beta) x + sqrt(beta) n`` of each skipped step,
composed). With a mask the known region of the result *is* the observation (at sigma = 0 the known
part is ``y`` exactly). Any projection operator works in place of the mask: the known part is the
row space of A (``x - P x + A^+ y + sigma P n``, Score-SDE's form).

Differences from the official code (andreas128/RePaint, recorded in docs/INVERSE.md): it replaces the
known region *before* each model call at the current t (so its final output's known region is the
model's, not the observation) and skips the replacement on the very first step; it runs discrete
VP steps with the model's learned variance; here eq. 8 is applied after each step, in sigma space,
with the DDPM posterior variance.

NFE: one per reverse transition: ``n + len(jump points) (jump_n_sample - 1) jump_length``
(:func:`jump_schedule`; 250 steps at the paper's defaults: 2410).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from ..errors import check
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
from ._common import check_int, lift, prepared, replace_known
from .operators import Operator, need_projection


def jump_schedule(n_steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """RePaint's resampling schedule as indices into ``sigmas`` (0 = ``sigmas[0]``, ``n_steps`` = sigma 0).

    Consecutive entries differ by one: ``+1`` is a reverse (denoising) step, ``-1`` a re-noising step.
    The same walk as the official ``get_schedule_jump`` with ``t_T = n_steps`` (time t is index
    ``n_steps - 1 - t``): length ``1 + n_steps + 2 J (jump_n_sample - 1) jump_length`` with
    ``J = len(range(0, n_steps - jump_length, jump_length))`` jump points.
    """
    check_int(n_steps, "the number of steps", 1)
    check_int(jump_length, "jump_length", 1)
    check_int(jump_n_sample, "jump_n_sample", 1)
    check(
        jump_n_sample == 1 or jump_length < n_steps,
        f"jump_length ({jump_length}) must be smaller than the number of steps ({n_steps}) when jump_n_sample > 1",
    )
    left = {t: jump_n_sample - 1 for t in range(0, n_steps - jump_length, jump_length)}  # jumps left per time
    t, times = n_steps - 1, [n_steps - 1]
    while t >= 0:
        t -= 1
        times.append(t)
        if left.get(t, 0) > 0:
            left[t] -= 1
            for _ in range(jump_length):
                t += 1
                times.append(t)
    return [n_steps - 1 - t for t in times]


@torch.no_grad()
def repaint(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    operator: Operator,
    y: torch.Tensor,
    *,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    noise: Noise = None,
) -> torch.Tensor:
    """Inpaint ``x`` (noise at ``sigmas[0]``) so that ``operator(x) = y``: RePaint with resampling.

    ``operator``: a :class:`~guidelab.inverse.Mask` (the paper) or any projection operator; ``y``: the
    known values ``operator(x0)`` [*out_shape] or [B, *out_shape]. ``jump_length = jump_n_sample = 1``
    (or ``jump_n_sample = 1``) is RePaint without resampling. ``noise``: ``SampleNoise`` for per-sample seeds.
    """
    sigmas = check_inputs(x, sigmas)
    op = need_projection(operator, "RePaint")
    op, y = prepared(op, y, x)
    schedule = jump_schedule(len(sigmas) - 1, jump_length, jump_n_sample)
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "repaint", frozenset())
    noise = resolve_noise(noise, x, sigmas)
    y_lift = lift(op, y, x)
    sig, batch, cond = sigmas.tolist(), x.shape[0], cond or {}
    progress_bar = None
    if progress:
        from tqdm.auto import tqdm

        progress_bar = tqdm(total=len(schedule) - 1, desc="repaint", leave=False)
    for k, k_next in itertools.pairwise(schedule):
        sigma, sigma_next = sig[k], sig[k_next]
        if k_next < k:  # re-noise back up (resampling jump)
            x = x + math.sqrt(sigma_next**2 - sigma**2) * noise(sigma, sigma_next)
        else:
            run.step = k  # the step sigmas[k] -> sigmas[k + 1]
            D = denoiser(x, torch.full((batch,), sigma, dtype=x.dtype, device=x.device), **cond)
            report(callback, x, k, sigmas, sigma, D)
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next)  # DDPM posterior (eta = 1)
            x = euler_step(None, x, D, sigma, sigma_down)
            if sigma_next > 0:
                x = x + sigma_up * noise(sigma, sigma_next)
            x = replace_known(x, op, y_lift, sigma_next, noise(sigma, sigma_next) if sigma_next > 0 else None)
        if progress_bar is not None:
            progress_bar.update()
    return x
