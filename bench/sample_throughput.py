"""Sampling throughput of ``guidelab sample`` at 1 and 2 torchrun ranks (CPU, gloo): the exact tree, or a
model (``--model CHECKPOINT_OR_RUN --label balanced``, e.g. the digits PixelMLP).

Alternates world sizes over rounds in one run, each a fresh job folder, and checks that the union
of samples is bit-identical. Usage: python bench/sample_throughput.py [--samples 4096] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from guidelab.app.jobs import load_samples


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--shard-size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sampler", default="heun")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--model", default=None, help="checkpoint or run folder (default: the exact tree)")
    ap.add_argument("--label", default=None, help="with --model: a class or 'balanced'")
    a = ap.parse_args()
    extra = (["--model", a.model] if a.model else []) + (["--label", a.label] if a.label else [])
    print(f"load average {os.getloadavg()}, cores {os.cpu_count()}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    times = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for nproc in (1, 2):
                out = Path(tmp) / f"r{r}_n{nproc}"
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc_per_node={nproc}",
                    "-m",
                    "guidelab",
                    "sample",
                    "--out",
                    str(out),
                    "--samples",
                    str(a.samples),
                    "--shard-size",
                    str(a.shard_size),
                    "--sampler",
                    a.sampler,
                    "--steps",
                    str(a.steps),
                    "--quiet",
                    *extra,
                ]
                t = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, capture_output=True)
                times[nproc].append(time.perf_counter() - t)
                print(
                    f"round {r} ranks {nproc}: {times[nproc][-1]:.1f} s  {a.samples / times[nproc][-1]:.0f} samples/s"
                    " (includes process start-up)",
                    flush=True,
                )
        x1, _ = load_samples(Path(tmp) / "r0_n1")
        x2, _ = load_samples(Path(tmp) / "r0_n2")
        print("union bit-identical across world sizes:", np.array_equal(x1, x2))
    b1, b2 = min(times[1]), min(times[2])
    print(f"best: 1 rank {a.samples / b1:.0f} samples/s, 2 ranks {a.samples / b2:.0f} samples/s, speed-up {b1 / b2:.2f}x")


if __name__ == "__main__":
    main()
