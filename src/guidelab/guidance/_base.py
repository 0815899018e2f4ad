"""The guidance mechanism: branches of denoisers, evaluated with one batched call per network.

Every linear guider here is ``D = D_ref + w (D_main - D_ref)`` (``w = 1``: no guidance), computed as
``D_ref.lerp(D_main, w)`` as in EDM2; ``torch.lerp`` returns ``D_main`` bit for bit at ``w = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..denoisers import bcast
from ..errors import check_weight

#: Override value that removes a conditioning key from a branch's call.
DROP = object()


@dataclass(frozen=True)
class Branch:
    """A denoiser and the conditioning overrides it is called with.

    Override values: a tensor (used as is), a number (filled to the shape of the existing tensor),
    :data:`DROP` (the key is removed) or a callable ``f(existing_value) -> value``.
    """

    denoiser: Callable[..., torch.Tensor]
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def cond(self, cond: Mapping[str, Any]) -> dict:
        out = dict(cond)
        for key, value in self.overrides.items():
            old = cond.get(key)
            if value is DROP:
                out.pop(key, None)
            elif callable(value) and not isinstance(value, torch.Tensor):
                out[key] = value(old)
            elif isinstance(value, (int, float, bool)) and isinstance(old, torch.Tensor):
                out[key] = torch.full_like(old, value)
            else:
                out[key] = value
        return out


def _batchable(conds: Sequence[dict], batch: int) -> bool:
    keys = set(conds[0])
    if any(set(c) != keys for c in conds):
        return False
    for k in keys:
        vals = [c[k] for c in conds]
        if all(isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == batch for v in vals):
            continue
        if any(isinstance(v, torch.Tensor) for v in vals) or any(v != vals[0] for v in vals[1:]):
            return False
    return True


def evaluate(branches: Sequence[Branch], x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any]) -> list[torch.Tensor]:
    """Evaluate every branch at (x, sigma); branches on the same network share one batched call."""
    out: list[torch.Tensor | None] = [None] * len(branches)
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(branches):
        groups.setdefault(id(b.denoiser), []).append(i)
    B = x.shape[0]
    for idx in groups.values():
        D = branches[idx[0]].denoiser
        conds = [branches[i].cond(cond) for i in idx]
        if len(idx) > 1 and _batchable(conds, B):
            k = len(idx)
            merged = {key: torch.cat([c[key] for c in conds]) if isinstance(conds[0][key], torch.Tensor) else conds[0][key]
                      for key in conds[0]}
            for i, chunk in zip(idx, D(x.repeat((k,) + (1,) * (x.ndim - 1)), sigma.repeat(k), **merged).chunk(k)):
                out[i] = chunk
        else:
            for i, c in zip(idx, conds):
                out[i] = D(x, sigma, **c)
    return out  # type: ignore[return-value]


class Guided:
    """``D = D_ref + w (D_main - D_ref)``: the rule behind CFG, autoguidance, ICG and TSG.

    ``w`` is a number or a per-sample [batch] tensor. At ``w == 1`` (a number) only the main branch is
    evaluated. ``unguided`` is the main branch alone (used by guidance intervals).
    """

    def __init__(self, main: Branch, ref: Branch, w, name: str):
        check_weight(w)
        self.main, self.ref, self.w, self.name = main, ref, w, name

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        if not isinstance(self.w, torch.Tensor) and self.w == 1:
            return self.unguided(x, sigma, **cond)
        D, D_ref = evaluate([self.main, self.ref], x, sigma, cond)
        w = bcast(self.w.to(D), D) if isinstance(self.w, torch.Tensor) else self.w
        return D_ref.lerp(D, w)

    def unguided(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self.main.denoiser(x, sigma, **self.main.cond(cond))

    def __repr__(self) -> str:
        return f"{self.name}(w={self.w})"
