"""The declared interfaces between denoisers, guiders and samplers.

* :class:`Condition` -- what a conditional *denoiser* declares as its ``condition`` attribute (read by
  ``cfg`` and ``icg``); a denoiser may also declare ``noise_embed_dim`` (read by ``tsg``).
* :class:`Guider` -- a denoiser built out of denoisers, with its main branch alone (``unguided``), the
  sampler features it ``requires`` and ``start(run)``, the guider bound to one sampling run.
* :class:`Run` -- one sampling run: the sigma grid, the per-sample seeds, the step index. Created by the
  sampler loop once per run and advanced once per step; per-run state (APG momentum) lives in it.
* :class:`OnePass` -- a one-evaluation guider from two plain denoisers (GFT, distilled students).

Sampler features (``requires`` of a guider, ``samplers.info(name).supports`` of a sampler):

* ``"renoise"``: the sampler takes its data term from ``D_data`` and its renoise / direction / history
  terms from ``D_renoise`` of :meth:`Guider.pair` (CFG++).

Layering: samplers read the contract, so ``Condition`` and ``Guider`` are defined in
:mod:`guidelab.denoisers` and ``Run`` in :mod:`guidelab.samplers.run`; this is their place in ``guidance``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..denoisers import Condition, Guider
from ..errors import check
from ..samplers.run import Run

__all__ = ["Condition", "Guider", "Run", "OnePass", "FEATURES"]

#: Sampler features a guider may require (see the module docstring).
FEATURES = frozenset({"renoise"})


class OnePass(Guider):
    """A one-evaluation guider from two plain denoisers: ``at_w`` (the guided result, e.g. a GFT or
    distilled student at weight w) and ``unguided`` (the same network at w = 1)."""

    def __init__(self, at_w: Callable[..., torch.Tensor], unguided: Callable[..., torch.Tensor], name: str):
        check(callable(at_w) and callable(unguided), "OnePass needs two denoisers (at_w, unguided)")
        self.at_w, self._unguided, self.name = at_w, unguided, name

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.at_w(x, sigma, **cond)

    def unguided(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self._unguided(x, sigma, **cond)

    def __repr__(self) -> str:
        return f"{self.name}(one pass)"
