"""Fused kernels (guidelab.fused): the compiled exact score equals the plain one to float rounding, gives the
same bits on any thread count, falls back to plain torch (with a warning) when it cannot compile, and an
explicit request without a compiler is refused before anything runs."""

import logging
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from guidelab import fused, toy
from guidelab.app.cli import main
from guidelab.errors import GuidelabError
from guidelab.training import ToyConfig, toy_trainer

needs_compiler = pytest.mark.skipif(fused.compiler() is None, reason="torch.compile needs a C++ compiler")


def _batch(world, n, seed=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sigma = (torch.randn(n, generator=g, dtype=dtype) * 1.5 - 2.3).exp()
    x = world.to(dtype).sample(n, sigma, generator=g)
    x[:3] = torch.tensor([[40.0, -40.0], [3.0, 3.0], [-2.0, 1.0]], dtype=dtype)  # far points: the general path
    sigma[:3] = torch.tensor([0.002, 0.01, 1e-3], dtype=dtype)
    return x, sigma


@needs_compiler
def test_fused_score_equals_the_full_sum_and_the_plain_path():
    w64 = toy.tree("AB", dtype=torch.float64)
    x, sigma = _batch(w64, 3000)
    full, fused64 = w64.score(x, sigma), w64.score_fast(x, sigma, fused=True)
    assert ((fused64 - full).norm(dim=1) <= 1e-9 * full.norm(dim=1)).all()
    w32 = toy.tree("A")
    x, sigma = _batch(w32, 4096, seed=5)
    full = w32.to(torch.float64).score(x, sigma)
    x, sigma = x.float(), sigma.float()
    plain, fast = w32.score_fast(x, sigma), w32.score_fast(x, sigma, fused=True)
    err, ref = ((t.double() - full).norm(dim=1) * sigma.double() for t in (fast, plain))
    assert err.max() <= 2 * ref.max() + 1e-6  # float32 rounding like the plain path's
    assert not torch.equal(fast, plain)  # really another code path (same values to rounding, not the same bits)


@pytest.mark.slow
@needs_compiler
def test_fused_score_same_bits_on_two_threads(tmp_path):
    """The kernel's reductions stay within a row: one thread and two give the same bits (two processes, so each
    compiles or loads its own kernel)."""
    w = toy.tree("A")
    x, sigma = (t.float() for t in _batch(w, 4096, seed=6))
    torch.save((x, sigma), tmp_path / "in.pt")
    code = (
        "import torch, sys; torch.set_num_threads(int(sys.argv[1])); from guidelab import toy; "
        f"x, s = torch.load({str(tmp_path / 'in.pt')!r}); "
        f"torch.save(toy.tree('A').score_fast(x, s, fused=True), {str(tmp_path)!r} + f'/out{{sys.argv[1]}}.pt')"
    )
    for n in (1, 2):
        subprocess.run([sys.executable, "-c", code, str(n)], check=True)
    assert torch.equal(torch.load(tmp_path / "out1.pt"), torch.load(tmp_path / "out2.pt"))


@needs_compiler
def test_fused_training_follows_the_plain_one():
    cfg = ToyConfig(batch=512, hidden=16, iters=4)
    plain, fast = toy_trainer(cfg), toy_trainer(cfg, fuse=True)
    losses = [(plain.train_step(), fast.train_step()) for _ in range(4)]
    for a, b in losses:
        assert abs(a - b) <= 1e-5 * abs(a)
    for p, q in zip(plain.net.parameters(), fast.net.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)


def test_a_kernel_that_cannot_compile_runs_plain_with_one_warning(caplog):
    def data_dependent(x):  # Python control flow on a value: fullgraph=True cannot trace it
        return x * 2 if float(x.sum()) > 0 else x

    k = fused.Kernel(data_dependent)
    x = torch.ones(3)
    with caplog.at_level(logging.WARNING, logger="guidelab"):
        assert torch.equal(k(x), x * 2) and torch.equal(k(-x), -x)
    assert k.failed and [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "could not be compiled" in caplog.records[0].getMessage()


def test_resolve(monkeypatch):
    monkeypatch.setattr(fused, "compiler", lambda: None)
    assert fused.resolve(False) is False and fused.resolve(None) is False
    with pytest.raises(GuidelabError, match="C\\+\\+ compiler"):
        fused.resolve(True)
    with pytest.raises(GuidelabError, match="fuse must be"):
        fused.resolve("yes")  # type: ignore[arg-type]
    monkeypatch.setattr(fused, "compiler", lambda: "/usr/bin/g++")
    assert fused.resolve(None) is True and fused.resolve(None, worth=False) is False
    monkeypatch.setenv(fused.ENV, "0")
    assert fused.resolve(None) is False and fused.resolve(True) is True  # the variable turns off only auto


def test_auto_fuses_only_long_score_runs(monkeypatch):
    from guidelab.training.toy import fuse_for

    monkeypatch.setattr(fused, "compiler", lambda: "/usr/bin/g++")
    assert fuse_for(ToyConfig(), None) and not fuse_for(ToyConfig(iters=512), None)
    assert not fuse_for(ToyConfig(loss="edm"), None) and not fuse_for(ToyConfig())  # off unless asked for
    with pytest.raises(GuidelabError, match="score loss"):
        fuse_for(ToyConfig(loss="edm"), True)  # the EDM loss has no fused kernel: refused, not ignored


def test_demo_fuse_without_a_compiler_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setattr(fused, "compiler", lambda: None)
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "--quick", "--fuse", "--out", str(out)])
    assert isinstance(r.exception, GuidelabError)  # cli.run prints it as one "error:" line, exit code 2
    assert "C++ compiler" in str(r.exception) and len(str(r.exception).splitlines()) == 1
    assert not out.exists()
