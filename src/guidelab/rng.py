"""Per-sample randomness: sample *i* depends only on its own seed, never on batch size or rank."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

#: A noise sampler returns standard normal noise shaped like the sample, for the step sigma -> sigma_next
#: (the k-diffusion convention, so a Brownian-tree source can be plugged in).
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SampleNoise:
    """One ``torch.Generator`` per sample, seeded by that sample's seed.

    ``SampleNoise(seeds).randn([2])`` draws a [len(seeds), 2] tensor whose row *i* depends only on
    ``seeds[i]`` and on how many draws were made before, so a run is bit-identical at any batch size.
    """

    def __init__(self, seeds: Sequence[int] | torch.Tensor, device: str | torch.device = "cpu"):
        seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
        if not seeds:
            raise ValueError("SampleNoise needs at least one seed")
        self.seeds = seeds
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of shape [len(seeds), *shape]."""
        return torch.stack([torch.randn(list(shape), generator=g, dtype=dtype, device=self.device)
                            for g in self.generators])

    def sampler(self, x: torch.Tensor) -> NoiseSampler:
        """A noise sampler for samples shaped like ``x`` (rows must match the seeds)."""
        if x.shape[0] != len(self.seeds):
            raise ValueError(f"x has batch {x.shape[0]} but SampleNoise has {len(self.seeds)} seeds")
        return lambda sigma, sigma_next: self.randn(x.shape[1:], x.dtype).to(x.device)


def global_noise(x: torch.Tensor) -> NoiseSampler:
    """Noise from torch's global generator (k-diffusion's default; *not* batch-size invariant)."""
    return lambda sigma, sigma_next: torch.randn_like(x)
