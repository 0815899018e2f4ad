"""EDM2's power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Sec. 3).

The EMA after ``t`` steps averages the training trajectory with weights ``∝ tau^gamma`` (tau <= t):
it tracks a fixed fraction of training, whatever its length. Its width relative to ``t`` is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))),          (EDM2 eq. 123)

and it is tracked step by step with ``beta_t = (1 - 1/t)^(gamma + 1)`` (eq. 127), so ``beta_1 = 0``.
:class:`PowerEMA` keeps one average per ``sigma_rel`` (several, for post-hoc EMA reconstruction from
periodic snapshots of each).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..errors import check

#: sigma_rel of gamma = 0 (a uniform average); gamma > 0 needs a smaller sigma_rel.
MAX_SIGMA_REL = math.sqrt(1 / 12)


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function profile ``tau^gamma``."""
    check(gamma > -1, f"gamma must be > -1, got {gamma!r}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma > 0`` with the given ``sigma_rel`` in (0, sqrt(1/12)).

    ``sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1`` is the cubic
    ``gamma^3 + 7 gamma^2 + (16 - 1/sigma_rel^2) gamma + 12 - 1/sigma_rel^2 = 0``; its largest real root.
    """
    check(
        isinstance(sigma_rel, (int, float)) and 0 < sigma_rel < MAX_SIGMA_REL,
        f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}), got {sigma_rel!r}",
    )
    k = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r))))


def power_beta(t: int, gamma: float) -> float:
    """EMA decay after ``t`` >= 1 optimiser steps: ``(1 - 1/t)^(gamma + 1)`` (0 at ``t = 1``)."""
    check(t >= 1, f"EMA step t must be >= 1, got {t}")
    return (1 - 1 / t) ** (gamma + 1)


class PowerEMA:
    """Power-function EMAs of a model's parameters, one per ``sigma_rel``.

    ``update(net, t)`` after the ``t``-th optimiser step (``t`` = 1, 2, ...). Buffers are copied, not
    averaged. ``state_dict()`` keys are ``"<i>/<name>"`` with ``i`` the profile index.
    """

    def __init__(self, net: torch.nn.Module, sigma_rels: Sequence[float] = (0.010,)):
        check(len(sigma_rels) > 0, "PowerEMA needs at least one sigma_rel")
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.names = [n for n, _ in net.named_parameters()]
        self.params = [[p.detach().clone() for _, p in net.named_parameters()] for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, t: int) -> None:
        src = [p.detach() for p in net.parameters()]
        for gamma, dst in zip(self.gammas, self.params):
            torch._foreach_lerp_(dst, src, 1 - power_beta(t, gamma))  # ema <- beta ema + (1 - beta) net

    def state_dict(self, i: int | None = None) -> dict[str, torch.Tensor]:
        """All profiles (``"<i>/<name>"`` keys), or profile ``i`` alone with plain parameter names."""
        if i is not None:
            return dict(zip(self.names, self.params[i]))
        return {f"{i}/{n}": p for i, ps in enumerate(self.params) for n, p in zip(self.names, ps)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, ps in enumerate(self.params):
            for n, p in zip(self.names, ps):
                p.copy_(tensors[f"{i}/{n}"])

    def model_state(self, net: torch.nn.Module, i: int = 0) -> dict[str, torch.Tensor]:
        """``net``'s state dict with profile ``i``'s averaged parameters (buffers from ``net``)."""
        state = dict(net.state_dict())
        state.update(self.state_dict(i))
        return state
