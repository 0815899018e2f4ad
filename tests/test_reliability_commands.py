"""Fault injection for `guidelab train`, `distill` and `sweep` (issue 14, item 7; `sample` is in
test_reliability_faults.py): a SIGKILL at a seeded random moment while the command writes, a disk that fills
up in the middle of a write (a hook on every atomic write raising ENOSPC after writing part of the file) and
a read-only output folder (a hook making every create under it fail with EROFS: the suite runs as root, for
whom chmod does not make a folder read-only). Each is followed by a rerun that must finish with outputs
identical to an uninterrupted run and no temp or partial file left. Also: every file these commands write
goes through ``_io.atomic_write`` (the write hook sees all of them)."""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from guidelab import _io
from guidelab.app import cli
from guidelab.errors import GuidelabError
from guidelab.training.images import ImageConfig, train_images

TINY = ["--set", "hidden=16", "--set", "depth=1", "--set", "emb=8", "--set", "batch=16", "--set", "snapshot_every=4"]
COMMANDS = {
    "train": lambda out, teacher: ["train", "--out", out, *TINY, "--set", "iters=12", "--set", "lr_ref_steps=4",
                                   "--checkpoint-every", "3", "--no-grid", "--threads", "1", "--quiet"],
    "distill": lambda out, teacher: ["distill", teacher, "--out", out, "--w-min", "1", "--w-max", "3", "--iters", "8",
                                     "--batch", "16", "--snapshot-every", "4", "--checkpoint-every", "2", "--threads", "1",
                                     "--quiet"],
    "sweep": lambda out, teacher: ["sweep", "--out", out, "--methods", "none,cfg", "--weights", "1,3", "--samples", "48",
                                   "--shard-size", "16", "--sampler", "euler", "--steps", "6", "--quiet"],
}  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


VOLATILE = {"provenance", "seconds", "sampling_seconds"}  # the command line, git commit, timings: not results


def _strip(d):
    """JSON without its provenance and timings."""
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in VOLATILE}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def _contents(folder: Path) -> dict:
    """Every result file of a folder by relative path: arrays, tensors and JSON compared by value, the rest by
    bytes; lock files (empty, kept on purpose) left out."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.name.endswith(".lock"):
            continue
        rel = str(f.relative_to(folder))
        if f.suffix == ".npz":
            with np.load(f, allow_pickle=False) as z:
                out[rel] = {k: (z[k].dtype.str, z[k].shape, z[k].tobytes()) for k in z.files if k != "info"}
                out[rel]["info"] = _strip(json.loads(str(z["info"]))) if "info" in z.files else None
        elif f.suffix == ".json":
            out[rel] = _strip(json.loads(f.read_text()))
        elif f.suffix == ".csv":
            rows = list(csv.DictReader(f.read_text().splitlines()))
            out[rel] = [_strip(r) for r in rows]
        elif f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                meta = {k: _strip(json.loads(v)) for k, v in (st.metadata() or {}).items()}
                out[rel] = (meta, {k: st.get_tensor(k).numpy().tobytes() for k in st.keys()})
        else:
            out[rel] = f.read_bytes()
    return out


def _temps(folder: Path) -> list[Path]:
    return [f for f in folder.rglob("*") if ".tmp" in f.name]


def _invoke(args) -> BaseException | None:
    r = CliRunner().invoke(cli.main, [str(a) for a in args])
    return None if r.exit_code == 0 else (r.exception or AssertionError(r.output))


def _hook_atomic_writes(monkeypatch, fail_at: int | None = None) -> list[Path]:
    """Route every guidelab module's ``atomic_write`` through a counter; write number ``fail_at`` writes 10
    bytes and then finds the disk full (ENOSPC)."""
    real, calls = _io.atomic_write, []

    def hooked(path, data):
        calls.append(Path(path))
        if len(calls) == fail_at:

            def partial(f):
                f.write(b"x" * 10)
                raise OSError(errno.ENOSPC, "No space left on device", str(path))

            return real(path, partial)
        return real(path, data)

    for name, mod in list(sys.modules.items()):
        if name.startswith("guidelab") and getattr(mod, "atomic_write", None) is real:
            monkeypatch.setattr(mod, "atomic_write", hooked)
    return calls


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    cfg = ImageConfig(hidden=16, depth=1, emb=8, batch=16, iters=4, snapshot_every=2)
    return train_images(tmp_path_factory.mktemp("teacher"), cfg, progress=False, plot=False, threads=1).parent


@pytest.fixture(scope="module")
def clean(tmp_path_factory, teacher):
    """Per command: (uninterrupted outputs, the paths its atomic writes made, its duration)."""
    mp = pytest.MonkeyPatch()
    out = {}
    try:
        for name, cmd in COMMANDS.items():
            d = tmp_path_factory.mktemp(f"clean-{name}") / "out"
            calls = _hook_atomic_writes(mp, None)
            t = time.monotonic()
            assert _invoke(cmd(d, teacher)) is None
            out[name] = (_contents(d), list(calls), time.monotonic() - t)
            mp.undo()
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_file_is_written_atomically(clean, name):
    contents, calls, _ = clean[name]
    written = {str(p.name) for p in calls}
    assert {Path(rel).name for rel in contents} <= written, sorted({Path(rel).name for rel in contents} - written)


@pytest.mark.parametrize("name", list(COMMANDS))
@pytest.mark.parametrize("where", [0.2, 0.7])
def test_disk_full_midway_then_rerun_is_identical(tmp_path, monkeypatch, clean, teacher, name, where):
    contents, calls, _ = clean[name]
    out = tmp_path / "out"
    _hook_atomic_writes(monkeypatch, max(1, int(where * len(calls))))
    err = _invoke(COMMANDS[name](out, teacher))
    assert isinstance(err, GuidelabError) and "No space left" in str(err), err  # one clear error, no traceback
    assert not _temps(tmp_path)
    monkeypatch.undo()
    assert _invoke(COMMANDS[name](out, teacher)) is None
    assert _contents(out) == contents and not _temps(tmp_path)


def _read_only(monkeypatch, root: Path) -> None:
    """Every create or write under ``root`` fails as on a read-only file system (EROFS)."""
    root = root.resolve()

    def under(p) -> bool:
        try:
            return Path(os.fsdecode(p)).resolve().is_relative_to(root)
        except (TypeError, ValueError):
            return False

    def refuse(p):
        raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(p))

    real_mkdir, real_open, real_mkstemp = os.mkdir, os.open, tempfile.mkstemp

    def mkdir(p, *a, **k):
        if under(p):
            refuse(p)
        return real_mkdir(p, *a, **k)

    def open_(p, flags, *a, **k):
        if under(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(p)
        return real_open(p, flags, *a, **k)

    def mkstemp(*a, dir=None, **k):
        if dir is not None and under(dir):
            refuse(dir)
        return real_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_read_only_output_is_refused_then_works(tmp_path, monkeypatch, clean, teacher, name):
    out = tmp_path / "out"
    out.mkdir()
    _read_only(monkeypatch, out)
    err = _invoke(COMMANDS[name](out, teacher))
    assert isinstance(err, GuidelabError) and "Read-only" in str(err), err
    monkeypatch.undo()
    assert list(out.iterdir()) == []  # nothing written
    assert _invoke(COMMANDS[name](out, teacher)) is None
    assert _contents(out) == clean[name][0] and not _temps(tmp_path)


def _cli(args):
    return [sys.executable, "-c", "from guidelab.app.cli import run; run()", *map(str, args)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
@pytest.mark.parametrize("seed", range(3))
def test_sigkill_at_a_random_moment_then_rerun_is_identical(tmp_path, clean, teacher, name, seed):
    """Killed at a seeded moment between its first file and (about) its end; the rerun resumes."""
    contents, _, duration = clean[name]
    out = tmp_path / "out"
    args = COMMANDS[name](out, teacher)
    p = subprocess.Popen(_cli(args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < 300 and not (out.exists() and any(out.rglob("*.*"))):
        time.sleep(0.005)
    time.sleep(random.Random(f"{name}-{seed}").uniform(0, duration))
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = subprocess.run(_cli(args), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert _contents(out) == contents and not _temps(tmp_path)
