"""Per-sample noise cost: guidelab.rng.SampleNoise against one torch.Generator per sample.

    python bench/sample_noise.py

Both give batch-size-invariant noise; the baseline is the usual way (EDM2's StackedRandomGenerator
idea): one generator per sample, one ``randn`` call per sample per draw. Times are medians of
alternating rounds in one process, on one thread.
"""

from __future__ import annotations

import statistics
import time

import torch

from guidelab.rng import SampleNoise


class PerSampleGenerators:
    def __init__(self, seeds):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def randn(self, shape):
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])


def timed(f, n=20) -> float:
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    torch.set_num_threads(1)
    print("| batch | shape per sample | generator per sample (ms) | SampleNoise (ms) | ratio |")
    print("|---:|---|---:|---:|---:|")
    for batch, shape in [(4096, [2]), (256, [2]), (64, [2]), (64, [3, 32, 32]), (256, [3, 32, 32]), (16, [4, 64, 64])]:
        base, ours = PerSampleGenerators(range(batch)), SampleNoise(range(batch))
        rounds = [(timed(lambda: base.randn(shape)), timed(lambda: ours.randn(shape))) for _ in range(5)]
        b, o = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
        print(f"| {batch} | {shape} | {b:.2f} | {o:.2f} | {o / b:.2f}x |")


if __name__ == "__main__":
    main()
