"""``training.loop.keep_freed_memory``: the process-wide glibc setting (mallopt) that keeps freed blocks in the
heap. A no-op where it is unsupported; it changes when memory goes back to the OS, never what is computed."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

from guidelab.training import loop


def _refuse_cdll(*args: object, **kwargs: object) -> object:
    raise AssertionError("ctypes.CDLL was called")


def test_no_op_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "_HEAP_KEPT", False)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ctypes, "CDLL", _refuse_cdll)
    loop.keep_freed_memory()  # returns before touching any C library
    assert loop._HEAP_KEPT is False


def test_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_glibc(name: str, *args: object, **kwargs: object) -> object:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(loop, "_HEAP_KEPT", False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    loop.keep_freed_memory()  # e.g. musl: nothing to set, no error


def test_called_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "_HEAP_KEPT", True)
    monkeypatch.setattr(ctypes, "CDLL", _refuse_cdll)
    loop.keep_freed_memory()  # already set: no second mallopt


_SAMPLES = textwrap.dedent(
    """
    import torch
    from guidelab import samplers, schedules
    from guidelab.rng import SampleNoise
    from guidelab.training import loop

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 512), torch.nn.SiLU(), torch.nn.Linear(512, 2))
    D = lambda x, s: x - s[:, None] * net(x)
    x = torch.randn(1024, 2) * 5.0  # activations of 2 MiB: above glibc's default mmap threshold
    sigmas = schedules.karras(6, 0.002, 5.0, dtype=torch.float32)

    def runs():
        with torch.no_grad():
            return [samplers.get(n)(D, x, sigmas, noise=SampleNoise(range(1024))) for n in ("euler", "dpmpp_2m_sde")]

    assert not loop._HEAP_KEPT
    before = runs()
    loop.keep_freed_memory()
    assert loop._HEAP_KEPT == sys.platform.startswith("linux")
    after = runs()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    print("ok")
    """
)


def test_samples_bit_identical_with_and_without() -> None:
    # A fresh process: the setting is process-wide and set once, and another test may have set it here.
    code = "import sys\n" + _SAMPLES
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
