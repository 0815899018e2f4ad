"""Fréchet distance on 2048-d statistics: guidelab (two eigh) vs scipy.linalg.sqrtm (pytorch-fid / clean-fid).

Both run side by side in one process, alternating rounds; prints each time, the ratio and the
relative difference. Then metric memory against sample count: FeatureStats (streaming) vs keeping
the features. Usage: python bench/frechet_speed.py [--dim 2048] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import tracemalloc

import numpy as np
import scipy.linalg
import torch

from guidelab.metrics import FeatureStats, frechet_distance


def scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1.dot(s2))   # what pytorch-fid does
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def make_stats(rng, n, d, shift):
    # features with a decaying spectrum, like Inception pool features (non-negative, correlated)
    x = rng.standard_normal((n, d)) * (1.0 / np.sqrt(1 + np.arange(d) / 64.0))
    x = np.abs(x @ rng.standard_normal((d, d)) / np.sqrt(d)) + shift
    return x.mean(0), np.cov(x, rowvar=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"load average {os.getloadavg()}, torch {torch.__version__}, scipy {scipy.__version__}, threads {a.threads}")
    rng = np.random.default_rng(0)
    s_a, s_b = make_stats(rng, a.n, a.dim, 0.0), make_stats(rng, a.n, a.dim, 0.05)
    args = (s_a[0], s_a[1], s_b[0], s_b[1])
    ours_t, ref_t = [], []
    for r in range(a.rounds):
        t = time.perf_counter(); ours = frechet_distance(*args); ours_t.append(time.perf_counter() - t)
        t = time.perf_counter(); ref = scipy_fd(*args); ref_t.append(time.perf_counter() - t)
        print(f"round {r}: ours {ours_t[-1]:.2f} s  scipy sqrtm {ref_t[-1]:.2f} s  ratio {ref_t[-1] / ours_t[-1]:.1f}x"
              f"  FD ours {ours:.9g} scipy {ref:.9g}  rel diff {abs(ours - ref) / abs(ref):.2e}")
    ratios = [b / o for o, b in zip(ours_t, ref_t)]
    print(f"median: ours {statistics.median(ours_t):.2f} s, scipy {statistics.median(ref_t):.2f} s, "
          f"speed-up {statistics.median(ratios):.1f}x (min {min(ratios):.1f}x, max {max(ratios):.1f}x)")

    print("\nmemory against sample count (D=256, batches of 1000):")
    d = 256
    for n in (1_000, 10_000, 100_000):
        tracemalloc.start()
        st = FeatureStats(d)
        for _ in range(n // 1000):
            st.update(torch.randn(1000, d, dtype=torch.float64))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        held = st.sum.element_size() * (st.sum.numel() + st.outer.numel())
        print(f"  n={n:>7}: FeatureStats holds {held / 2**20:.2f} MiB (peak traced {peak / 2**20:.2f} MiB); "
              f"keeping all features would hold {n * d * 8 / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
