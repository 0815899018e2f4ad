"""Fréchet distance on 2048-d statistics: guidelab (two eigh) vs scipy.linalg.sqrtm (pytorch-fid / clean-fid).

Both run side by side in one process, alternating rounds; prints each time, the ratio and the
relative difference. Then metric memory against sample count: FeatureStats (streaming) vs keeping
the features. Usage: python bench/frechet_speed.py [--dim 2048] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import scipy.linalg
import torch

from guidelab.metrics import frechet_distance


def scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1.dot(s2))  # what pytorch-fid does
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
        t = time.perf_counter()
        ours = frechet_distance(*args)
        ours_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = scipy_fd(*args)
        ref_t.append(time.perf_counter() - t)
        print(
            f"round {r}: ours {ours_t[-1]:.2f} s  scipy sqrtm {ref_t[-1]:.2f} s  ratio {ref_t[-1] / ours_t[-1]:.1f}x"
            f"  FD ours {ours:.9g} scipy {ref:.9g}  rel diff {abs(ours - ref) / abs(ref):.2e}"
        )
    ratios = [b / o for o, b in zip(ours_t, ref_t)]
    if ratios:
        print(
            f"median: ours {statistics.median(ours_t):.2f} s, scipy {statistics.median(ref_t):.2f} s, "
            f"speed-up {statistics.median(ratios):.1f}x (min {min(ratios):.1f}x, max {max(ratios):.1f}x)"
        )

    print("\nmemory against sample count (D=2048, batches of 500; peak RSS of a fresh process):")
    for n in (2_000, 8_000, 32_000):
        for mode in ("stream", "keep"):
            code = (
                "import torch, resource; from guidelab.metrics import FeatureStats\n"
                f"st, kept = FeatureStats(2048), []\n"
                f"for i in range({n} // 500):\n"
                f"    f = torch.randn(500, 2048, generator=torch.Generator().manual_seed(i))\n"
                f"    st.update(f) if '{mode}' == 'stream' else kept.append(f)\n"
                "import re; print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
            )
            kib = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            print(f"  n={n:>6} {'FeatureStats' if mode == 'stream' else 'keep features':>13}: peak RSS {kib / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
