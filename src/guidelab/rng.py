"""Per-sample randomness: sample *i* depends only on its own seed, never on batch size or rank."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import check

#: A noise sampler returns standard normal noise shaped like the sample, for the step sigma -> sigma_next
#: (the k-diffusion convention, so a Brownian-tree source can be plugged in).
NoiseSampler = Callable[[float, float], torch.Tensor]


def _i64(c: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _C1, _C2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser (Steele, Lea & Flood 2014) on int64 tensors (wrapping arithmetic)."""
    z = (z ^ _shr(z, 30)) * _C1
    z = (z ^ _shr(z, 27)) * _C2
    return z ^ _shr(z, 31)


def _uniform(state: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in (0, 1) from the top 53 bits of the mixed state."""
    return (_shr(_mix(state), 11).double() + 0.5) * 2.0**-53


#: Per-sample draws up to this many values use the vectorised hash; larger ones a generator per sample.
_VECTOR_MAX = 128
#: A small draw also computes the values of the next draws of its size, up to this many values over the batch and
#: this many draws; the next draws are slices of them. A value is a pure function of its index, so this changes no
#: value; it saves the ~40 small ops a draw costs (a sampler draws once per step).
_AHEAD_VALUES, _AHEAD_DRAWS = 2**14, 32


class SampleNoise:
    """Per-sample Gaussian noise: row *i* is a pure function of ``seeds[i]`` and a draw counter.

    Each sample has its own splitmix64 stream (Steele et al. 2014). A draw of at most
    ``_VECTOR_MAX`` values per sample is made for the whole batch at once by hashing
    (seed stream, counter) and Box-Muller -- no per-sample generator calls; a larger draw (an image)
    seeds torch's generator per sample from the stream, which is faster per value.
    ``SampleNoise(seeds).randn([2])`` draws a [len(seeds), 2] tensor whose row *i* depends only on
    ``seeds[i]`` and on how many values were drawn before, so a run is bit-identical at any batch
    size, on any number of processes and on any device (values are made on the CPU in float64).
    """

    def __init__(self, seeds: Sequence[int] | torch.Tensor, device: str | torch.device = "cpu"):
        seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
        check(len(seeds) > 0, "SampleNoise needs at least one seed")
        check(-(1 << 63) <= min(seeds) and max(seeds) < 1 << 63, "seeds must fit in a signed 64-bit integer")
        self.seeds = seeds
        self.device = torch.device(device)
        self._stream = _mix(torch.tensor(seeds, dtype=torch.int64) + _GOLDEN)  # per-sample stream key
        self._drawn = 0  # values drawn per sample
        # draws computed ahead (last one first) for the next small draws of one shape and dtype
        self._queue: list[torch.Tensor] = []
        self._queue_key: tuple[tuple[int, ...], torch.dtype, int] | None = None  # (shape, dtype, next value index)

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of shape [len(seeds), *shape]."""
        shape = tuple(int(d) for d in shape)
        numel = math.prod(shape)
        j0, self._drawn = self._drawn, self._drawn + numel
        if numel <= _VECTOR_MAX:
            # Small draws (points, low-dimensional data): the whole batch in vectorised integer ops, with the
            # next draws of this shape computed ahead in the same pass.
            if not self._queue or self._queue_key != (shape, dtype, j0):
                draws = max(1, min(_AHEAD_DRAWS, _AHEAD_VALUES // max(1, len(self.seeds) * numel)))
                v = self._values(j0, draws * numel).view(len(self.seeds), draws, *shape)
                # [draws, batch, *shape]: each draw contiguous, in the asked dtype, on the device
                block = v.movedim(1, 0).to(dtype, memory_format=torch.contiguous_format).to(self.device)
                self._queue = list(reversed(block.unbind(0)))
            self._queue_key = shape, dtype, j0 + numel
            return self._queue.pop()
        # Large draws (images): torch's own fast generator, reseeded per sample from the stream.
        keys = _shr(_mix(self._stream + torch.tensor(2 * j0 + 1, dtype=torch.int64) * _GOLDEN), 1).tolist()
        g = torch.Generator()
        z = torch.stack([torch.randn(shape, generator=g.manual_seed(k)) for k in keys])  # float32 draws
        return z.to(dtype=dtype, device=self.device)

    def _values(self, j0: int, n: int) -> torch.Tensor:
        """Values ``j0 .. j0 + n - 1`` of every sample, float64 [batch, n]: value j is Box-Muller of splitmix64
        states 2j+1 and 2j+2 of the sample's stream (hashed in one pass, [batch, 2, n])."""
        k = torch.arange(2 * j0 + 1, 2 * (j0 + n) + 1, dtype=torch.int64).view(n, 2).t()
        u = _uniform(self._stream[:, None, None] + k[None] * _GOLDEN)
        return u[:, 0].log_().mul_(-2).sqrt_().mul_(torch.cos(u[:, 1].mul_(2 * math.pi)))

    def sampler(self, x: torch.Tensor) -> NoiseSampler:
        """A noise sampler for samples shaped like ``x`` (rows must match the seeds)."""
        check(x.shape[0] == len(self.seeds), f"x has batch {x.shape[0]} but SampleNoise has {len(self.seeds)} seeds")
        return lambda sigma, sigma_next: self.randn(x.shape[1:], x.dtype).to(x.device)


def global_noise(x: torch.Tensor) -> NoiseSampler:
    """Noise from torch's global generator (k-diffusion's default; *not* batch-size invariant)."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def step_generator(seed: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator that depends only on ``(seed, step)`` (hashed, so nearby seeds do not overlap): the randomness
    of training step ``step`` (:mod:`guidelab.training.loop`)."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))
