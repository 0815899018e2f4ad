"""Limited-interval guidance; the method's documentation is :func:`interval`'s docstring."""

from __future__ import annotations

import copy
from typing import Any, Callable, TypeVar

import torch

from ..errors import check
from .protocols import Guider, Run

#: What a gated call returns: a denoiser's D, or the (D_data, D_renoise) pair of :meth:`Guider.pair`.
_Out = TypeVar("_Out", torch.Tensor, tuple[torch.Tensor, torch.Tensor])


def _take(cond: dict, m: torch.Tensor, B: int) -> dict:
    return {k: v[m] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == B else v for k, v in cond.items()}


class Interval(Guider):
    """``guider`` inside (sigma_lo, sigma_hi], its unguided main branch outside; see :func:`interval`."""

    def __init__(self, guider: Guider, sigma_lo: float, sigma_hi: float) -> None:
        check(
            isinstance(guider, Guider),
            f"interval needs a guider with an unguided branch (cfg, autoguidance, icg, "
            f"tsg, apg, ...), got {type(guider).__name__}",
        )
        check(0 <= sigma_lo < sigma_hi, f"need 0 <= sigma_lo < sigma_hi, got sigma_lo={sigma_lo}, sigma_hi={sigma_hi}")
        self.guider, self.sigma_lo, self.sigma_hi = guider, float(sigma_lo), float(sigma_hi)
        self.name, self.requires = f"interval[{guider.name}]", guider.requires

    def _run(
        self,
        inside_fn: Callable[..., _Out],
        outside_fn: Callable[..., _Out],
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: dict[str, Any],
    ) -> _Out:
        inside = (sigma > self.sigma_lo) & (sigma <= self.sigma_hi)
        if bool(inside.all()):
            return inside_fn(x, sigma, **cond)
        if not bool(inside.any()):
            return outside_fn(x, sigma, **cond)
        B = x.shape[0]
        out: Any = None  # the output filled part by part: a tensor, or a tuple of tensors
        for m, fn in ((inside, inside_fn), (~inside, outside_fn)):
            part = fn(x[m], sigma[m], **_take(cond, m, B))
            if isinstance(part, tuple):
                out = out or tuple(p.new_empty(x.shape) for p in part)
                for o, p in zip(out, part):
                    o[m] = p
            else:
                out = part.new_empty(x.shape) if out is None else out
                out[m] = part
        return out

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self._run(self.guider, self.guider.unguided, x, sigma, cond)

    def unguided(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.guider.unguided(x, sigma, **cond)

    def pair(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The guider's (D_data, D_renoise) inside (CFG++ inside an interval); ``(D, D)`` outside."""

        def outside(x: torch.Tensor, sigma: torch.Tensor, **c: Any) -> tuple[torch.Tensor, torch.Tensor]:
            D = self.guider.unguided(x, sigma, **c)
            return D, D

        return self._run(self.guider.pair, outside, x, sigma, cond)

    def start(self, run: Run) -> "Interval":
        bound = self.guider.start(run)
        if bound is self.guider:
            return self
        new = copy.copy(self)
        new.guider = bound
        return new

    def __repr__(self) -> str:
        return f"{self.name}(({self.sigma_lo:g}, {self.sigma_hi:g}])"


def interval(guider: Guider, sigma_lo: float, sigma_hi: float) -> Interval:
    """Limited-interval guidance (Kynkäänniemi et al., NeurIPS 2024, arXiv 2404.07724).

    ``D = guider(x; sigma)`` for ``sigma in (sigma_lo, sigma_hi]``, else the guider's unguided main branch
    (1 NFE), as in the paper (Sec. 4): guidance at high noise levels costs variation, at low ones it does
    little. Works with any :class:`~guidelab.guidance.Guider` (cfg, autoguidance, icg, tsg, apg, cfgpp, ...);
    it requires what ``guider`` requires.

    Per-sample sigma: the gate is per sample; a batch whose samples fall on both sides is split into two
    calls (inside: the guider; outside: one evaluation). Samplers pass one sigma per step, so no split
    happens there and the cost is exactly 2 NFE per evaluation inside, 1 outside.

    The official code gates by step indices ``[start, stop]`` of the 32-step EDM Heun schedule (both Heun
    evaluations of a step share the gate); a sigma gate differs only at the two boundary evaluations.
    EDM2-XXL FID-optimal: steps [17, 22], w = 2.0, i.e. sigma in (0.28, 1.61] (methods.md §5).
    """
    return Interval(guider, sigma_lo, sigma_hi)
