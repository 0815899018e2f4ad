"""Perp-Neg; the method's documentation is :func:`perp_neg`'s docstring."""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch

from ..denoisers import bcast
from ..errors import GuidelabError, check
from ._base import Branch, Guided, Rule, batch_dot, evaluate, is_off
from .weight_schedule import WeightSchedule, keep_unguided


class PerpNeg(Guided):
    """``guider``'s two branches and a negative one; see :func:`perp_neg`."""

    neg: Branch
    neg_w: float

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        if is_off(self.w):
            return self.unguided(x, sigma, **cond)
        D, D_u, D_n = evaluate([self.main, self.ref, self.neg], x, sigma, cond, self.run)
        w = self.w.at(sigma, self.run) if isinstance(self.w, WeightSchedule) else self.w
        w = bcast(w.to(D), D) if isinstance(w, torch.Tensor) else w
        e_pos, e_neg = (D - D_u).double(), (D_n - D_u).double()
        par = bcast(batch_dot(e_neg, e_pos) / batch_dot(e_pos, e_pos).clamp_min(1e-300), e_pos) * e_pos
        return keep_unguided(w, D, D_u + w * (e_pos - self.neg_w * (e_neg - par)).to(D.dtype))

    def with_rule(self, rule: Rule, name: str) -> Guided:
        raise GuidelabError(f"{name} needs a linear guider (cfg, autoguidance, icg, tsg), got {self.name}")


def perp_neg(guider: Guided, negative: Mapping[str, Any], neg_w: float = 1.0) -> Guided:
    """Perp-Neg (Armandpour et al. 2023, arXiv 2304.04968, eq. 9 with one negative) on ``guider``
    (cfg, autoguidance, icg, tsg): its main branch called with the ``negative`` overrides (e.g.
    ``{"label": 1}``) is a third branch; the negative direction's part parallel to the positive one is
    removed before it is subtracted::

        e_+ = D_c - D_u,   e_- = D_neg - D_u,   e_-perp = e_- - <e_-, e_+> / ||e_+||^2 e_+
        D   = D_u + w (e_+ - neg_w e_-perp)

    Differences are per sample (float64); the projection is the same in eps or x0 space (eps = (x - D)/sigma
    scales differences by -1/sigma). ``neg_w = 0`` is the guider itself; ``w = 1``: no guidance. Cost: one
    more branch, in the same batched call when the negative runs on the main network.
    """
    check(
        type(guider) is Guided and guider.rule is None,
        f"perp_neg needs a linear guider (cfg, autoguidance, icg, tsg), got {getattr(guider, 'name', guider)!r}",
    )
    check("renoise" not in guider.requires, f"perp_neg cannot honour {guider.name}'s renoise step")
    check(
        isinstance(negative, Mapping) and len(negative) > 0,
        "perp_neg needs the negative condition as overrides, e.g. {'label': 1}",
    )
    if neg_w == 0:
        return guider
    new: PerpNeg = copy.copy(guider)  # type: ignore[assignment]
    new.__class__ = PerpNeg
    new.neg, new.neg_w, new.name = (
        Branch(guider.main.denoiser, {**guider.main.overrides, **negative}),
        float(neg_w),
        f"perp_neg[{guider.name}]",
    )
    return new
