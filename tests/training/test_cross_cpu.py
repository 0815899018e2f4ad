"""Toy training on another CPU (docs/RELIABILITY.md "Determinism"): by default MKL picks its GEMM kernels by
CPU, so two CPUs agree only to float rounding; under ``MKL_CBWR=COMPATIBLE`` the weights do not depend on the
instruction set torch or MKL may use (emulated here with ``ATEN_CPU_CAPABILITY`` / ``MKL_ENABLE_INSTRUCTIONS``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without MKL (MKL_CBWR has no effect)")

STEPS = """
import hashlib, torch
torch.set_num_threads(1)
from guidelab.training import ToyConfig, toy_trainer
t = toy_trainer(ToyConfig(batch=1024, iters=64))
for _ in range(8):
    t.train_step()
print(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in t.net.parameters())).hexdigest())
"""


def _weights(**env: str) -> str:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("MKL_", "ATEN_CPU", "OMP_"))}
    r = subprocess.run([sys.executable, "-c", STEPS], env={**keep, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()[-1]


def test_compatible_branch_gives_the_same_weights_whatever_the_instruction_set():
    pinned = {"MKL_CBWR": "COMPATIBLE"}
    a = _weights(**pinned)
    assert _weights(**pinned, ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2") == a
    assert _weights() != a  # the variable takes effect: the default kernels round differently
