"""One sampling run: created by the sampler loop once per run, advanced once per step. Guiders bound to it
(``Guider.start(run)``) read its step index and per-sample seeds and keep their per-run state in it."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import check


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
        check(
            self.seeds is None or len(self.seeds) == self.batch,
            f"x has batch {self.batch} but the run has {None if self.seeds is None else len(self.seeds)} seeds",
        )
        self.step = 0
        self.evaluations = 0
        self.sampler = ""  # the sampler's name, set by samplers.base.begin_run (for error messages)
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
