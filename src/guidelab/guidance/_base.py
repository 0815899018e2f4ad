"""The guidance mechanism: branches of denoisers, evaluated with one batched call per network.

Every linear guider here is ``D = D_ref + w (D_main - D_ref)`` (``w = 1``: no guidance), computed as
``D_ref.lerp(D_main, w)`` as in EDM2; ``torch.lerp`` returns ``D_main`` bit for bit at ``w = 1``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..denoisers import bcast
from ..errors import check, check_weight
from .protocols import Guider, Run
from .weight_schedule import WeightSchedule, keep_unguided

#: Override value that removes a conditioning key from a branch's call.
DROP = object()


@dataclass(frozen=True)
class PerCall:
    """An override computed at each call from ``(old_value, x, sigma)`` (random labels, noise offsets);
    ``with_run=True``: from ``(old_value, x, sigma, run)``, ``run`` the guider's :class:`Run` (None outside one)."""

    fn: Callable[..., Any]
    with_run: bool = False


@dataclass(frozen=True)
class Branch:
    """A denoiser and the conditioning overrides it is called with.

    Override values: a tensor (used as is), a number (filled to the shape of the existing tensor),
    :data:`DROP` (the key is removed), a callable ``f(existing_value) -> value`` or a :class:`PerCall`
    ``f(existing_value, x, sigma) -> value``.
    """

    denoiser: Callable[..., torch.Tensor]
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def cond(
        self, cond: Mapping[str, Any], x: torch.Tensor | None = None, sigma: torch.Tensor | None = None, run: Run | None = None
    ) -> dict:
        out = dict(cond)
        if not self.overrides:
            return out
        for key, value in self.overrides.items():
            old = cond.get(key)
            if value is DROP:
                out.pop(key, None)
            elif isinstance(value, PerCall):
                out[key] = value.fn(old, x, sigma, run) if value.with_run else value.fn(old, x, sigma)
            elif callable(value) and not isinstance(value, torch.Tensor):
                out[key] = value(old)
            elif isinstance(value, (int, float, bool)) and isinstance(old, torch.Tensor):
                out[key] = torch.full_like(old, value)
            else:
                out[key] = value
        return out


def _batchable(conds: Sequence[dict], batch: int) -> bool:
    first = conds[0]
    for c in conds[1:]:
        if c.keys() != first.keys():
            return False
    for k, v0 in first.items():
        if isinstance(v0, torch.Tensor) and v0.ndim >= 1 and v0.shape[0] == batch:
            for c in conds[1:]:
                v = c[k]
                if not (isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == batch):
                    return False
            continue
        for c in conds[1:]:
            v = c[k]
            if isinstance(v0, torch.Tensor) or isinstance(v, torch.Tensor) or v != v0:
                return False
    return True


def evaluate(
    branches: Sequence[Branch], x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any], run: Run | None = None
) -> list[torch.Tensor]:
    """Evaluate every branch at (x, sigma); branches on the same network share one batched call."""
    out: list[torch.Tensor | None] = [None] * len(branches)
    if len(branches) == 2 and branches[0].denoiser is branches[1].denoiser:  # the common case: one network
        groups: Any = ([0, 1],)
    else:
        by_net: dict[int, list[int]] = {}
        for i, b in enumerate(branches):
            by_net.setdefault(id(b.denoiser), []).append(i)
        groups = by_net.values()
    B = x.shape[0]
    for idx in groups:
        D = branches[idx[0]].denoiser
        conds = [branches[i].cond(cond, x, sigma, run) for i in idx]
        if len(idx) > 1 and _batchable(conds, B):
            k = len(idx)
            merged = {
                key: torch.cat([c[key] for c in conds]) if isinstance(v0, torch.Tensor) else v0 for key, v0 in conds[0].items()
            }
            # torch.cat of k copies: the same values as x.repeat, at a fraction of its cost for small batches
            for i, chunk in zip(idx, D(torch.cat([x] * k), torch.cat([sigma] * k), **merged).chunk(k)):
                out[i] = chunk
        else:
            for i, c in zip(idx, conds):
                out[i] = D(x, sigma, **c)
    return out  # type: ignore[return-value]


#: A combination rule ``rule(D_main, D_ref, w, x, sigma, run) -> D`` (``w`` already broadcast to ``D``; ``run``
#: the guider's :class:`Run`, None outside a sampler run).
Rule = Callable[[torch.Tensor, torch.Tensor, Any, torch.Tensor, torch.Tensor, "Run | None"], torch.Tensor]


def is_off(w: object) -> bool:
    """``w`` is the number 1 (no guidance: only the main branch is evaluated)."""
    return not isinstance(w, torch.Tensor) and w == 1


class Guided(Guider):
    """``D = D_ref + w (D_main - D_ref)``: the rule behind CFG, autoguidance, ICG and TSG.

    ``w`` is a number or a per-sample [batch] tensor. At ``w == 1`` (a number) only the main branch is
    evaluated. ``unguided`` is the main branch alone (used by guidance intervals). ``rule`` replaces the
    linear combination by a non-linear one of the same two branches (guidance rescale, CFG-Zero*, APG);
    see :meth:`with_rule`. ``start(run)`` gives a copy bound to the run (per-call draws and rules see it).
    """

    run: Run | None = None
    w: Any  # float | Tensor | WeightSchedule (Any: subclasses and rules use it as a number or a tensor)

    def __init__(
        self, main: Branch, ref: Branch, w: float | torch.Tensor | WeightSchedule, name: str, rule: Rule | None = None
    ) -> None:
        if not isinstance(w, WeightSchedule):
            check_weight(w)
        self.main, self.ref, self.w, self.name, self.rule = main, ref, w, name, rule

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        if is_off(self.w):
            return self.unguided(x, sigma, **cond)
        D, D_ref = self.branches(x, sigma, cond)
        w = self.w.at(sigma, self.run) if isinstance(self.w, WeightSchedule) else self.w
        w = bcast(w.to(D), D) if isinstance(w, torch.Tensor) else w
        if self.rule is not None:  # rows whose weight is exactly 1 stay the main branch, bit for bit
            return keep_unguided(w, D, self.rule(D, D_ref, w, x, sigma, self.run))
        return D_ref.lerp(D, w)

    def branches(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D_main, D_ref)`` at (x, sigma), same-network branches in one batched call."""
        D, D_ref = evaluate([self.main, self.ref], x, sigma, cond, self.run)
        return D, D_ref

    def unguided(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.main.denoiser(x, sigma, **self.main.cond(cond, x, sigma, self.run))

    def start(self, run: Run) -> "Guided":
        new = copy.copy(self)
        new.run = run
        return new

    def with_rule(self, rule: Rule, name: str) -> "Guided":
        """The same branches and weight combined by ``rule`` (only one non-linear rule per guider)."""
        check(self.rule is None, f"{name} needs a linear guider (cfg, autoguidance, icg, tsg), got {self.name}")
        check(
            "renoise" not in self.requires,
            f"{name} cannot honour {self.name}'s renoise step (it rewrites the "
            f"guided output, CFG++ the sampler's step): use {name} on cfg, or {self.name} alone",
        )
        new = copy.copy(self)
        new.rule, new.name = rule, name
        return new

    def __repr__(self) -> str:
        return f"{self.name}(w={self.w})"


def batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product over all non-batch dims: [batch, ...] x [batch, ...] -> [batch]."""
    return (a * b).flatten(1).sum(1)


def per_sample_seeds(seeds: Sequence[int], sigma: torch.Tensor, salt: int) -> list[int]:
    """Seeds for one call: a hash of (sample seed, that sample's sigma, salt).

    Random draws made from them are independent across samples and noise levels, depend only on the
    sample's own seed (batch-size invariant) and need no state between calls or runs.
    """
    sig = sigma.detach().double().cpu().tolist()
    check(len(seeds) == len(sig), f"the guider has {len(seeds)} seeds but the batch has {len(sig)} samples")
    return [hash((int(s), float(v), salt)) & 0x7FFF_FFFF_FFFF_FFFF for s, v in zip(seeds, sig)]


def draw_seeds(seeds: Sequence[int] | None, run: Run | None) -> Sequence[int] | None:
    """The seeds a guider draws from: its own ``seeds``, else the run's per-sample seeds, else None
    (fresh draws from torch's global generator)."""
    if seeds is not None:
        return seeds
    return None if run is None else run.seeds


def draw_normal(
    seeds: Sequence[int] | None, sigma: torch.Tensor, shape: Sequence[int], salt: int, like: torch.Tensor
) -> torch.Tensor:
    """Standard normal [batch, *shape], drawn afresh at every call: per sample from ``(seed, sigma, salt)``
    (see per_sample_seeds) or, ``seeds=None``, from torch's global generator."""
    if seeds is None:
        out = torch.randn([sigma.shape[0], *shape], dtype=torch.float64)
    else:
        gens = [torch.Generator().manual_seed(s) for s in per_sample_seeds(seeds, sigma, salt)]
        out = torch.stack([torch.randn(list(shape), generator=g, dtype=torch.float64) for g in gens])
    return out.to(dtype=like.dtype if like.is_floating_point() else torch.get_default_dtype(), device=like.device)


def draw_labels(
    seeds: Sequence[int] | None, sigma: torch.Tensor, num_classes: int, salt: int, like: torch.Tensor
) -> torch.Tensor:
    """Uniform random labels in [0, num_classes), shape [batch], drawn afresh at every call (as draw_normal)."""
    if seeds is None:
        out = torch.randint(num_classes, (sigma.shape[0],))
    else:
        gens = [torch.Generator().manual_seed(s) for s in per_sample_seeds(seeds, sigma, salt)]
        out = torch.cat([torch.randint(num_classes, (1,), generator=g) for g in gens])
    return out.to(dtype=like.dtype, device=like.device)
