"""The declared interfaces between denoisers, guiders and samplers.

* :class:`Condition` -- what a conditional *denoiser* declares as its ``condition`` attribute (read by
  ``cfg`` and ``icg``); a denoiser may also declare ``noise_embed_dim`` (read by ``tsg``).
* :class:`Guider` -- a denoiser built out of denoisers, with its main branch alone (``unguided``), the
  sampler features it ``requires`` and ``start(run)``, the guider bound to one sampling run.
* :class:`Run` -- one sampling run: the sigma grid, the per-sample seeds, the step index. Created by the
  sampler loop once per run and advanced once per step; per-run state (APG momentum) lives in it.

Sampler features (``requires`` of a guider, ``samplers.info(name).supports`` of a sampler):

* ``"renoise"``: the sampler takes its data term from ``D_data`` and its renoise / direction / history
  terms from ``D_renoise`` of :meth:`Guider.pair` (CFG++).

This module imports nothing from the rest of ``guidance`` (samplers import it).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..errors import check

#: Sampler features a guider may require (see the module docstring).
FEATURES = frozenset({"renoise"})


@dataclass(frozen=True)
class Condition:
    """The conditioning a denoiser takes: ``D(x, sigma, **{key: value})``.

    ``null``: the overrides that make the unconditional (reference) branch, e.g. ``{"label": 10}``;
    ``num_classes``: the number of class labels (ICG draws uniform labels), None for a continuous embedding.
    """

    key: str
    null: Mapping[str, Any] = field(default_factory=dict)
    num_classes: int | None = None


class Run:
    """One sampling run over ``sigmas`` (the grid, ending in 0) for a batch shaped like ``x``.

    ``seeds``: the per-sample seeds when the sampler's noise has them (``SampleNoise``, ``BrownianNoise``),
    else None. ``step``: index ``i`` of the current step ``sigmas[i] -> sigmas[i + 1]``, set by
    :meth:`steps` (every evaluation inside one step, e.g. Heun's second, sees the same ``i``).
    ``evaluations``: denoiser calls made so far. :meth:`state` keeps per-run state of a guider.
    """

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], seeds: Sequence[int] | None = None):
        self.sigmas = torch.as_tensor(sigmas)
        self.batch = int(x.shape[0])
        self.seeds = None if seeds is None else [int(s) for s in seeds]
        check(self.seeds is None or len(self.seeds) == self.batch,
              f"x has batch {self.batch} but the run has {None if self.seeds is None else len(self.seeds)} seeds")
        self.step = 0
        self.evaluations = 0
        self._state: dict[int, tuple[object, Any]] = {}

    def steps(self, progress: bool = False, desc: str = "") -> Iterator[int]:
        """The step indices ``0 .. n-1``; sets :attr:`step` before each step (the one place it advances)."""
        n = len(self.sigmas) - 1
        it: Any = range(n)
        if progress:
            from tqdm.auto import trange
            it = trange(n, desc=desc, leave=False)
        for i in it:
            self.step = i
            yield i

    def state(self, owner: object, make: Callable[[], Any]) -> Any:
        """The per-run state of ``owner`` (a guider or rule), made by ``make()`` on first use."""
        entry = self._state.get(id(owner))
        if entry is None or entry[0] is not owner:
            entry = (owner, make())
            self._state[id(owner)] = entry
        return entry[1]


class Guider(abc.ABC):
    """A denoiser built out of denoisers (``w = 1``: no guidance).

    ``name``: for messages and reprs; ``requires``: sampler features it needs (``{"renoise"}`` for CFG++).
    ``unguided`` is the main branch alone (1 NFE; guidance intervals use it). ``start(run)`` returns the
    guider bound to one sampling run (samplers call it once per run; default: the guider itself).
    ``pair`` is ``(D_data, D_renoise)`` for samplers with the renoise step; ``(D, D)`` unless a guider
    requires ``"renoise"``.
    """

    name: str = "guider"
    requires: frozenset[str] = frozenset()

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor: ...

    @abc.abstractmethod
    def unguided(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor: ...

    def start(self, run: Run) -> "Guider":
        return self

    def pair(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        D = self(x, sigma, **cond)
        return D, D


class OnePass(Guider):
    """A one-evaluation guider from two plain denoisers: ``at_w`` (the guided result, e.g. a GFT or
    distilled student at weight w) and ``unguided`` (the same network at w = 1)."""

    def __init__(self, at_w: Callable[..., torch.Tensor], unguided: Callable[..., torch.Tensor], name: str):
        check(callable(at_w) and callable(unguided), "OnePass needs two denoisers (at_w, unguided)")
        self.at_w, self._unguided, self.name = at_w, unguided, name

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self.at_w(x, sigma, **cond)

    def unguided(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self._unguided(x, sigma, **cond)

    def __repr__(self) -> str:
        return f"{self.name}(one pass)"
