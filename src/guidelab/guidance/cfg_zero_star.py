"""CFG-Zero* (Fan et al. 2025, arXiv 2503.18886; WeichenFan/CFG-Zero-star): optimised scale and zero-init.

In the rectified-flow velocity space of the paper (``v = eps - x0``, see ``_spaces``), per sample::

    s* = <v_c, v_u> / ||v_u||^2                     (optimised scale, eq. for s* in Sec. 4)
    v  = s* v_u + w (v_c - s* v_u)                  (guided velocity)
    v  = 0          for the first steps             (zero-init)

The official code applies it to the flow models' velocity output and zero-inits step indices
``i <= zero_steps`` (default 0: the first step). Guiders are stateless, so zero-init is given as a
noise level: ``v = 0`` wherever ``sigma >= zero_init_sigma`` (pass ``sigmas[K - 1]`` to zero the first
K steps of an Euler run). In EDM terms ``v = 0`` is ``D = x / (1 + sigma)``: the rescaled sample
``x / (1 + sigma)`` does not move. Weight ``w`` as in the paper and diffusers (``w = 1``: no guidance,
zero-init included, so ``w = 1`` stays bit-identical to the unguided denoiser).
"""

from __future__ import annotations

from ..denoisers import bcast
from ._base import Guided, batch_dot
from ._spaces import check_space, from_space, to_space


def cfg_zero_star(guider: Guided, *, zero_init_sigma: float | None = None, space: str = "flow") -> Guided:
    """``guider`` (cfg or another linear guider) with CFG-Zero*'s optimised scale and zero-init.

    ``space="flow"`` is the paper's; ``"eps"``/``"x0"``/``"v"`` apply the same rule to other outputs.
    """
    check_space(space)

    def rule(D, D_ref, w, x, sigma):
        v_c, v_u = to_space(D, x, sigma, space), to_space(D_ref, x, sigma, space)
        s_star = bcast(batch_dot(v_c, v_u) / batch_dot(v_u, v_u).clamp_min(1e-30), v_c)
        v_u = s_star * v_u
        v = v_u.lerp(v_c, w)
        if zero_init_sigma is not None:
            v = v.masked_fill(bcast(sigma >= zero_init_sigma, v), 0.0)
        return from_space(v, x, sigma, space)

    return guider.with_rule(rule, f"cfg_zero_star[{guider.name}]")
