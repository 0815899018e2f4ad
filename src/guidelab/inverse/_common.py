"""Pieces the inverse-problem samplers share: the measurement checks, the replacement of the known
component, gradients under ``no_grad`` and an NFE counter."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import check
from .operators import Operator, as_operator


def prepared(operator: object, y: torch.Tensor, x: torch.Tensor) -> tuple[Operator, torch.Tensor]:
    """``(operator, y)`` checked against ``x``: y broadcast to [B, *out_shape], no NaN, shapes match."""
    op = as_operator(operator)
    op._as_sample(x)
    return op, op.measurement(y, x.shape[0], x)


def replace_known(x: torch.Tensor, op: Operator, y_lift: torch.Tensor, sigma: float, n: torch.Tensor | None) -> torch.Tensor:
    """``x - P x + A^+ y + sigma P n``: the known component (row space of A) replaced by the observation
    forward-noised to ``sigma`` (``P = A^+ A``; for a mask ``m * known + (1 - m) * x``, RePaint eq. 8)."""
    x = x - op.project(x) + y_lift
    if sigma > 0:
        assert n is not None  # callers pass noise whenever sigma > 0
        x = x + sigma * op.project(n)
    return x


def lift(op: Operator, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``A^+ y`` shaped like ``like``."""
    return op.pinv(y).reshape(like.shape).to(like)


def grad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(x), grad_x fn(x).sum())`` for ``fn(x) -> [B]``; works under no_grad / inference_mode."""
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        out = fn(xg)
        check(
            isinstance(out, torch.Tensor) and out.shape == x.shape[:1],
            f"the objective must return one value per sample, shape [{x.shape[0]}], "
            f"got {getattr(out, 'shape', type(out).__name__)}",
        )
        (g,) = torch.autograd.grad(out.sum(), xg)
    return out.detach(), g.detach()


def through_denoiser(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: dict,
    objective: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D(x), grad_x objective(D(x)).sum())``: a gradient taken through the denoiser (DPS, TSDiff, steered)."""
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        D = denoiser(xg, sigma.clone(), **cond)
        out = objective(D)
        check(
            isinstance(out, torch.Tensor) and out.shape == x.shape[:1],
            f"the objective must return one value per sample, shape [{x.shape[0]}], "
            f"got {getattr(out, 'shape', type(out).__name__)}",
        )
        (g,) = torch.autograd.grad(out.sum(), xg)
    return D.detach(), g.detach()


def vp(sigma: float) -> float:
    """``1 / sqrt(abar) = sqrt(1 + sigma^2)``: VP -> EDM scale of x at noise level sigma."""
    return math.sqrt(1 + sigma * sigma)


def check_int(value: object, name: str, lo: int) -> None:
    check(
        isinstance(value, int) and not isinstance(value, bool) and value >= lo,
        f"{name} must be an integer >= {lo}, got {value!r}",
    )


def check_number(value: object, name: str, *, positive: bool = False) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
    )
    check(
        ok,
        f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}",
    )


class Counting:
    """A denoiser that counts its calls (``nfe``: calls per sample) and the rows it evaluates (``rows``)."""

    def __init__(self, denoiser: Callable[..., torch.Tensor]):
        check(callable(denoiser), f"Counting needs a denoiser, got {type(denoiser).__name__}")
        self.denoiser, self.nfe, self.rows = denoiser, 0, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        self.nfe += 1
        self.rows += x.shape[0]
        return self.denoiser(x, sigma, **cond)
