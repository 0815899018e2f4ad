"""ILVR: iterative latent variable refinement (Choi et al., ICCV 2021, arXiv 2108.02938, Alg. 1).

After each unconditional DDPM step to ``sigma_next`` the low frequencies are swapped for the
reference's (their eq. 4-5, in sigma space)::

    x' ~ p(x_{t-1} | x_t)                                  (DDPM step, eta = 1)
    y' = ref + sigma_next n                                (reference forward-noised, q(y_{t-1} | y))
    x  = x' + phi_N(y') - phi_N(x')                        (eq. 5)

with ``phi_N`` the low-pass filter "downsample by N, upsample by N". Here ``phi_N`` is
:class:`~guidelab.inverse.Downsample` (average pooling, nearest upsampling), an orthogonal projection,
so after every conditioned step ``phi_N(x) = phi_N(y')`` exactly and at sigma = 0 ``phi_N(x) =
phi_N(ref)``; any projection operator can be passed instead (for a mask ILVR is RePaint without
resampling). ``range_t``: the refinement is skipped on the last ``range_t`` steps (their
"conditioning range", Sec. 4.2; 0 = every step, as Alg. 1).

Differences from the official code (jychoi118/ilvr_adm): a bicubic (antialiased) resizer, which is
not a projection; the reference noised to the *current* t instead of t-1; refinement only for
``i > range_t``, so even at ``range_t = 0`` the final step is unconditioned. Defaults there:
``down_N = 32`` on 256 px, 1000 steps.

NFE: 1 per step.
"""

from __future__ import annotations

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
from .operators import Downsample, Operator, need_projection


@torch.no_grad()
def ilvr(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    ref: torch.Tensor,
    *,
    factor: int | None = None,
    operator: Operator | None = None,
    range_t: int = 0,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    noise: Noise = None,
) -> torch.Tensor:
    """Sample ``x`` (noise at ``sigmas[0]``) following the low frequencies of ``ref`` (ILVR).

    ``ref``: the reference, shaped like one sample or like ``x``. Give either ``factor`` (N: the
    low-pass ``Downsample(shape, N)``) or ``operator`` (any projection operator). ``range_t``: number
    of final steps left unconditioned.
    """
    sigmas = check_inputs(x, sigmas)
    check((factor is None) != (operator is None), "ilvr needs exactly one of factor (the downsampling N) or operator")
    if operator is None:
        assert factor is not None  # checked above: exactly one of factor / operator
        operator = Downsample(tuple(x.shape[1:]), factor)
    op = need_projection(operator, "ILVR")
    ref = torch.as_tensor(ref)
    ref = ref.expand_as(x) if ref.shape == x.shape[1:] else ref
    check(
        ref.shape == x.shape,
        f"ref must be shaped like one sample {list(x.shape[1:])} or like x {list(x.shape)}, got {list(ref.shape)}",
    )
    op, y = prepared(op, op(ref.to(x)), x)
    n = len(sigmas) - 1
    check_int(range_t, "range_t", 0)
    check(range_t <= n, f"range_t must be at most the number of steps ({n}), got {range_t}")
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "ilvr", frozenset())
    noise = resolve_noise(noise, x, sigmas)
    y_lift = lift(op, y, x)
    sig, batch, cond = sigmas.tolist(), x.shape[0], cond or {}
    for i in run.steps(progress, "ilvr"):
        sigma, sigma_next = sig[i], sig[i + 1]
        D = denoiser(x, torch.full((batch,), sigma, dtype=x.dtype, device=x.device), **cond)
        report(callback, x, i, sigmas, sigma, D)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        x = euler_step(None, x, D, sigma, sigma_down)
        if sigma_next > 0:
            x = x + sigma_up * noise(sigma, sigma_next)
        if i < n - range_t:  # eq. 5
            x = replace_known(x, op, y_lift, sigma_next, noise(sigma, sigma_next) if sigma_next > 0 else None)
    return x
