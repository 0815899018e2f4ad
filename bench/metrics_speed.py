"""k-NN metrics speed: precision/recall + density/coverage, the former all-pairs implementation (exact
cdist + kthvalue, real-real pass twice) vs metrics.prdc (float32 GEMM screen with an error bound, grouped
minima, exact float64 re-check; one real-real pass), with two floors printed beside them, timed in the
same run: the screen's own four N x N x (D + 2) float32 matrix products alone (the floor of this
method), and the three N x N x D float64 products an exact-arithmetic GEMM method needs.

    OMP_NUM_THREADS=1 python bench/metrics_speed.py [--n 5000 20000] [--dim 128] [--old-max 5000]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from guidelab import metrics
from guidelab.metrics.pointcloud import dist


def old(real, fake, chunk=2048):
    """The former implementation, kept here as the reference."""

    def radii(x, k):
        return torch.cat([dist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])

    def cov(p, c, r):
        return torch.cat([(dist(q, c) <= r).any(1) for q in p.split(chunk)]).double().mean().item()

    out = {"precision": cov(fake, real, radii(real, 3)), "recall": cov(real, fake, radii(fake, 3))}
    r5, count, covered = radii(real, 5), 0, torch.zeros(len(real), dtype=torch.bool)
    for c in fake.split(chunk):
        inside = dist(c, real) <= r5
        count += inside.sum().item()
        covered |= inside.any(0)
    return {**out, "density": count / (5 * len(fake)), "coverage": covered.double().mean().item()}


CLOCK = time.process_time  # CPU time (--wall: wall clock): on a loaded machine descheduled time is not counted


def floor(real, fake, dtype=torch.float64, extra=0, budget=metrics.knn.BUDGET, pairs=3):
    """The matrix products alone: real-real, fake-fake, fake-real (and real-fake when pairs=4)."""
    real = torch.cat([real, real[:, :extra]], 1).to(dtype)
    fake = torch.cat([fake, fake[:, :extra]], 1).to(dtype)
    rows = max(1, budget // len(real))
    t = CLOCK()
    for a, b in ((real, real), (fake, fake), (fake, real), (real, fake))[:pairs]:
        bt = b.T
        for s in range(0, len(a), rows):
            a[s : s + rows] @ bt
    return CLOCK() - t


def timed(fn, *args):
    t = CLOCK()
    out = fn(*args)
    return out, CLOCK() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[5000, 20000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--old-max", type=int, default=5000, help="skip the old implementation above this N")
    ap.add_argument("--wall", action="store_true", help="wall-clock time instead of this process's CPU time")
    a = ap.parse_args()
    global CLOCK
    if a.wall:
        CLOCK = time.perf_counter
    clock = "wall" if a.wall else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), D={a.dim}, float64, {clock} time")
    for n in a.n:
        g = torch.Generator().manual_seed(0)
        real = torch.randn(n, a.dim, generator=g, dtype=torch.float64)
        fake = torch.randn(n, a.dim, generator=g, dtype=torch.float64) * 1.1 + 0.1
        metrics.knn._CACHE.clear()
        f32 = floor(real, fake, torch.float32, extra=2, pairs=4)
        new, t_new = timed(metrics.prdc, real, fake)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        f64 = floor(real, fake)
        line = (
            f"N={n}: new {t_new:.2f} s (peak RSS so far {rss:.0f} MiB, data {2 * real.numel() * 8 / 2**20:.0f} MiB), "
            f"float32 screen GEMM floor {f32:.2f} s (ratio {t_new / f32:.2f}), float64 GEMM floor {f64:.2f} s, "
            f"load {os.getloadavg()[0]:.1f}"
        )
        if n <= a.old_max:
            ref, t_old = timed(old, real, fake)
            line += f", old {t_old:.2f} s, identical={ref == new}"
        print(line, {k: round(v, 4) for k, v in new.items()}, flush=True)


if __name__ == "__main__":
    main()
