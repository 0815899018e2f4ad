"""The demo's wall time on a quiet machine and under one background CPU-bound job (issue 15: ``make demo``
within 5 minutes on 2 cores that also run one other CPU-bound job).

Runs ``guidelab demo --quiet`` (a fresh output folder each time, so the toy models are trained too) twice:
alone, then beside a load generator (one process multiplying matrices with torch's default thread count,
what another PyTorch job on the machine does). Prints both wall times and the thread count the demo
chose (guidelab.threads: small models, one thread). ``--threads N`` passes an explicit count to compare
with the default; ``--args`` passes more demo options (e.g. ``--args "--quick"`` for a smoke run).

    .venv/bin/python bench/demo_load.py                  # default threads, quiet and loaded
    .venv/bin/python bench/demo_load.py --threads 2      # torch's old default on a 2-core machine
    .venv/bin/python bench/demo_load.py --load-threads 1 # the other job single-threaded
    .venv/bin/python bench/demo_load.py --fresh-clone    # `make demo` in a fresh clone: venv + install + demo

``--fresh-clone`` is the issue's literal test: ``git clone`` of this checkout (its committed HEAD) into a temporary folder, then
``make demo ARGS=--quiet`` there, timed whole (virtual environment, the CPU torch wheel, guidelab's core
dependencies, the demo). pip's download cache of the machine is used as it is.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = """
import torch
a = torch.randn(1024, 1024)
while True:
    a = torch.tanh(a @ a.T / 32)
"""


def run_demo(extra: list[str], threads: int | None, fresh: bool = False) -> tuple[float, str]:
    with tempfile.TemporaryDirectory(prefix="guidelab-demo-load-") as d:
        args = [*extra] + (["--threads", str(threads)] if threads is not None else [])
        if fresh:
            root = Path(__file__).resolve().parents[1]
            subprocess.run(["git", "clone", "-q", str(root), str(Path(d) / "clone")], check=True)
            cmd = ["make", "-C", str(Path(d) / "clone"), "demo", f"ARGS=--quiet {shlex.join(args)}".strip()]
        else:
            cmd = [sys.executable, "-m", "guidelab", "demo", "--quiet", "--out", str(Path(d) / "demo"), *args]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "VIRTUAL_ENV")}
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            raise SystemExit(f"demo failed ({r.returncode}):\n{r.stderr[-2000:]}")
        return wall, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="Pass --threads N to the demo (default: its own choice).")
    ap.add_argument("--args", default="", help="More demo options, e.g. '--quick --samples 512'.")
    ap.add_argument("--skip-quiet", action="store_true", help="Only the loaded run.")
    ap.add_argument("--fresh-clone", action="store_true", help="Time `make demo` in a fresh clone (set-up included).")
    ap.add_argument(
        "--load-threads",
        type=int,
        default=None,
        help="Threads of the load generator (default: torch's default, i.e. every core; 1: one single-threaded job).",
    )
    a = ap.parse_args()
    extra = shlex.split(a.args)
    print(
        f"cores available: {len(os.sched_getaffinity(0))}; demo options: {' '.join(extra) or '(defaults)'}; "
        f"threads: {a.threads or 'default (guidelab.threads)'}" + ("; fresh clone, `make demo`" if a.fresh_clone else "")
    )
    if not a.skip_quiet:
        wall, _ = run_demo(extra, a.threads, a.fresh_clone)
        print(f"quiet machine:            {wall:7.1f} s")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if a.load_threads is not None:
        env["OMP_NUM_THREADS"] = str(a.load_threads)
    load = subprocess.Popen([sys.executable, "-c", LOAD], env=env)
    try:
        time.sleep(2.0)  # the load is running
        wall, out = run_demo(extra, a.threads, a.fresh_clone)
    finally:
        load.terminate()
        load.wait()
    lt = a.load_threads or "torch's default"
    print(f"one CPU-bound job beside ({lt} threads): {wall:7.1f} s   (goal: <= 300 s on 2 cores)")
    print(out.strip().splitlines()[-1] if out.strip() else "")


if __name__ == "__main__":
    main()
