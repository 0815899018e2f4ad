"""Fault injection (issue 14, item 7): a SIGKILL at a seeded random moment of ``guidelab sample``, a full
disk in the middle of a job, a read-only output folder -- each followed by a rerun that must finish with
outputs identical to an uninterrupted run and no temp or partial file left."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from guidelab import _io
from guidelab.app import jobs
from guidelab.errors import GuidelabError

ARGS = ["--samples", "60", "--shard-size", "3", "--steps", "8", "--guider", "cfg", "--weight", "2", "--quiet"]
CFG = jobs.SampleConfig(guider="cfg", w=2.0, steps=8)


def _cli(out):
    return [sys.executable, "-c", "from guidelab.app.cli import run; run()", "sample", "--out", str(out), *ARGS]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    jobs.sample(d, CFG, n=60, shard_size=3)
    return jobs.load_samples(d)


@pytest.mark.parametrize("seed", [0, *(pytest.param(k, marks=pytest.mark.slow) for k in (1, 2, 3))])
def test_sigkill_then_rerun_is_identical(tmp_path, clean, seed):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(_cli(tmp_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not list(tmp_path.glob("shard-*.npz")) and time.monotonic() - t0 < 60 and p.poll() is None:
        time.sleep(0.01)  # killed while writing shards
    time.sleep(random.Random(seed).uniform(0, 0.05))
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = subprocess.run(_cli(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    x, s = jobs.load_samples(tmp_path)
    assert np.array_equal(s, clean[1]) and np.array_equal(x, clean[0])
    assert not [f for f in tmp_path.iterdir() if ".tmp" in f.name]


def test_disk_full_midway_then_rerun_is_identical(tmp_path, clean, monkeypatch):
    real, calls = _io.atomic_write, []

    def full(path, data):  # the 5th write finds the disk full
        calls.append(path)
        if len(calls) == 5:

            def partial(f):
                f.write(b"x" * 10)
                raise OSError(errno.ENOSPC, "No space left on device", str(path))

            return real(path, partial)
        return real(path, data)

    import guidelab.app.jobs.shards as shards

    monkeypatch.setattr(shards, "atomic_write", full)
    with pytest.raises(OSError):
        jobs.sample(tmp_path, CFG, n=60, shard_size=3)
    assert not [f for f in tmp_path.iterdir() if ".tmp" in f.name]
    monkeypatch.setattr(shards, "atomic_write", real)
    jobs.sample(tmp_path, CFG, n=60, shard_size=3)
    x, s = jobs.load_samples(tmp_path)
    assert np.array_equal(x, clean[0])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused_then_works(tmp_path, clean):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises((GuidelabError, PermissionError)):
            jobs.sample(out, CFG, n=60, shard_size=3)
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)
    jobs.sample(out, CFG, n=60, shard_size=3)
    assert np.array_equal(jobs.load_samples(out)[0], clean[0])
