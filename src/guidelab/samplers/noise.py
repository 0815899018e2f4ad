"""Brownian-tree noise: per-sample Brownian motions in sigma, so the noise of a step is the same
Brownian increment whatever the step sizes (a run refined with more steps stays consistent)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import GuidelabError, check
from ..rng import NoiseSampler


class BrownianNoise:
    """One Brownian motion ``W`` on ``[0, sigma_max]`` per sample seed (torchsde's Brownian interval,
    halfway tree with tolerance ``tol``); ``noise(sigma, sigma_next) = (W(sigma) - W(sigma_next)) /
    sqrt(sigma - sigma_next)``, standard normal. Row *i* depends only on ``seeds[i]``.

    ``sigma_max`` defaults to the first sigma of the run; fix it to compare runs on different schedules.
    Needs the ``torchsde`` package.
    """

    def __init__(self, seeds: Sequence[int] | torch.Tensor, *, sigma_max: float | None = None, tol: float = 1e-6):
        self.seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
        check(len(self.seeds) > 0, "BrownianNoise needs at least one seed")
        check(sigma_max is None or sigma_max > 0, f"sigma_max must be > 0, got {sigma_max}")
        self.sigma_max, self.tol = sigma_max, tol

    def __len__(self) -> int:
        return len(self.seeds)

    def tree_sampler(self, x: torch.Tensor, sigma_max: float | None = None) -> NoiseSampler:
        """A noise sampler for samples shaped like ``x`` (rows must match the seeds)."""
        try:
            import torchsde
        except ImportError:
            raise GuidelabError("BrownianNoise needs the torchsde package: pip install torchsde") from None
        check(x.shape[0] == len(self.seeds), f"x has batch {x.shape[0]} but BrownianNoise has {len(self.seeds)} seeds")
        t1 = self.sigma_max if self.sigma_max is not None else sigma_max
        check(t1 is not None, "BrownianNoise needs sigma_max (or a run that starts at it)")
        assert t1 is not None
        trees = [
            torchsde.BrownianInterval(
                t0=0.0,
                t1=float(t1),
                size=tuple(x.shape[1:]),
                dtype=x.dtype,
                device=x.device,
                entropy=s,
                tol=self.tol,
                halfway_tree=True,
            )
            for s in self.seeds
        ]

        def sample(sigma: float, sigma_next: float) -> torch.Tensor:
            lo, hi = float(sigma_next), float(sigma)
            check(0 <= lo < hi <= t1 * (1 + 1e-12), f"BrownianNoise covers sigma in [0, {t1:g}], asked for ({lo:g}, {hi:g})")
            return torch.stack([tree(lo, min(hi, t1)) for tree in trees]) / math.sqrt(hi - lo)

        return sample
