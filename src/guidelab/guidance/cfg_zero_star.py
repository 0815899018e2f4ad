"""CFG-Zero*; the method's documentation is :func:`cfg_zero_star`'s docstring."""

from __future__ import annotations

import torch

from ..denoisers import bcast
from ..errors import GuidelabError, check
from ._base import Guided, batch_dot
from ._spaces import check_space, from_space, to_space
from .protocols import Run


def cfg_zero_star(
    guider: Guided, *, zero_steps: int | None = None, zero_init_sigma: float | None = None, space: str = "flow"
) -> Guided:
    """CFG-Zero* (Fan et al. 2025, arXiv 2503.18886; WeichenFan/CFG-Zero-star) of ``guider`` (cfg or
    another linear guider): optimised scale and zero-init.

    In the rectified-flow velocity space of the paper (``v = eps - x0``, see ``_spaces``), per sample::

        s* = <v_c, v_u> / ||v_u||^2                     (optimised scale, eq. for s* in Sec. 4)
        v  = s* v_u + w (v_c - s* v_u)                  (guided velocity)
        v  = 0          for the first steps             (zero-init)

    Zero-init, by default as the paper and diffusers do (``ClassifierFreeZeroStarGuidance(zero_init_steps=1)``; the
    official ``zero_steps = 0`` zeroes step index 0): ``zero_steps`` (default 1) is the number of first
    steps of the sampler run zeroed, read from the run's step index (:class:`~guidelab.guidance.Run`), so
    both evaluations of a Heun step are zeroed alike; calling it outside a sampler run is then an error.
    ``zero_init_sigma`` instead gates by noise level, with no run needed: ``v = 0`` wherever
    ``sigma >= zero_init_sigma`` (``sigmas[K - 1]`` zeroes the first K steps of an Euler run). ``zero_steps=0``
    turns zero-init off. In EDM terms ``v = 0`` is ``D = x / (1 + sigma)``: the rescaled sample
    ``x / (1 + sigma)`` does not move. Weight ``w`` as in the paper and diffusers (``w = 1``: no guidance,
    zero-init included, so ``w = 1`` stays bit-identical to the unguided denoiser).
    ``space="flow"`` is the paper's; ``"eps"``/``"x0"``/``"v"`` apply the same rule to other outputs.
    """
    check_space(space)
    check(
        zero_steps is None or zero_init_sigma is None,
        "cfg_zero_star takes zero_steps (a step count) or zero_init_sigma (a noise level), not both",
    )
    if zero_init_sigma is None:
        zero_steps = 1 if zero_steps is None else zero_steps
        check(
            isinstance(zero_steps, int) and not isinstance(zero_steps, bool) and zero_steps >= 0,
            f"zero_steps must be an integer >= 0, got {zero_steps!r}",
        )
    else:
        zero_steps = 0

    def rule(
        D: torch.Tensor, D_ref: torch.Tensor, w: float | torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, run: Run | None
    ) -> torch.Tensor:
        v_c, v_u = to_space(D, x, sigma, space), to_space(D_ref, x, sigma, space)
        s_star = bcast(batch_dot(v_c, v_u) / batch_dot(v_u, v_u).clamp_min(1e-30), v_c)
        v = (s_star * v_u).lerp(v_c, w)
        if zero_steps:
            if run is None:
                raise GuidelabError(
                    f"cfg_zero_star zero-initialises the first {zero_steps} steps of a sampler run: "
                    "call it through a sampler, bind it with .start(guidance.Run(x, sigmas)), or pass "
                    "zero_steps=0 or zero_init_sigma=..."
                )
            if run.step < zero_steps:
                return from_space(v.new_zeros(v.shape), x, sigma, space)
        if zero_init_sigma is not None:
            v = v.masked_fill(bcast(sigma >= zero_init_sigma, v), 0.0)
        return from_space(v, x, sigma, space)

    return guider.with_rule(rule, f"cfg_zero_star[{guider.name}]")
