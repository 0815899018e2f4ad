"""Sums of linear guiders that share a main branch; the documentation is :func:`compose`'s docstring."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from ..denoisers import bcast
from ..errors import check
from ._base import Guided, evaluate, is_off
from .protocols import Guider, Run
from .weight_schedule import WeightSchedule


class Composed(Guider):
    """``D + sum_k (w_k - 1)(D - D_k)`` over linear guiders ``(D, D_k, w_k)`` sharing the main branch ``D``."""

    run: Run | None = None

    def __init__(self, guiders: Sequence[Guided]) -> None:
        check(len(guiders) >= 1, "compose needs at least one guider")
        for g in guiders:
            check(
                isinstance(g, Guided) and g.rule is None,
                f"compose takes linear guiders (cfg, autoguidance, icg, tsg, pag, ...), got {g!r}",
            )
            check(
                not g.requires, f"compose cannot honour {g.name}'s sampler needs ({', '.join(sorted(g.requires))}): use it alone"
            )
            check(
                g.main == guiders[0].main,
                f"compose: {g.name} has another main branch than {guiders[0].name} (same denoiser and overrides needed)",
            )
        self.main = guiders[0].main
        self.parts = [(g.ref, g.w) for g in guiders]
        self.name = "+".join(g.name for g in guiders)
        self.guiders = list(guiders)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        parts = [(ref, w) for ref, w in self.parts if not is_off(w)]
        if not parts:
            return self.unguided(x, sigma, **cond)
        D, *refs = evaluate([self.main, *(ref for ref, _ in parts)], x, sigma, cond, self.run)
        out = None
        for D_k, (_, w) in zip(refs, parts):
            w = w.at(sigma, self.run) if isinstance(w, WeightSchedule) else w
            w = bcast(w.to(D), D) if isinstance(w, torch.Tensor) else w
            g_k = D_k.lerp(D, w)  # D + (w_k - 1)(D - D_k)
            out = g_k if out is None else out + (g_k - D)
        assert out is not None
        return out

    def unguided(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.main.denoiser(x, sigma, **self.main.cond(cond, x, sigma, self.run))

    def start(self, run: Run) -> "Composed":
        new = copy.copy(self)
        new.run = run
        return new

    def __repr__(self) -> str:
        return " + ".join(repr(g) for g in self.guiders)


def compose(*guiders: Guided) -> Composed:
    """A guider of guiders: linear guiders that share their main branch, summed.

    Every linear guider is ``g_k = D_k + w_k (D - D_k) = D + (w_k - 1)(D - D_k)``, so several of them with
    the same main branch ``D`` combine as ``D_w = D + sum_k (g_k - D) = D + sum_k (w_k - 1)(D - D_k)``.

    CFG + PAG (Ahn et al. 2024, and diffusers' PAG pipelines) is the case k = 2:
    ``D_u + w_cfg (D_c - D_u) + (w_pag - 1)(D_c - D_pert)``; diffusers' ``pag_scale`` is ``w_pag - 1`` and
    its ``guidance_scale`` is ``w_cfg``. All branches go through one :func:`~guidelab.guidance.evaluate`,
    so branches on the same network run as one batched call (3B rows for CFG + PAG). With one guider the
    result is that guider's, bit for bit; ``w_k = 1`` drops that term (and its branch evaluation).
    Example: ``compose(cfg(den, 4.0), autoguidance(den, guide, 2.0))``. Guiders with sampler needs
    (cfgpp) are refused.
    """
    return Composed(guiders)
