import sys
from dataclasses import dataclass

import pytest
import torch

from guidelab.errors import GuidelabError
from guidelab.training import LoopConfig, ToyConfig
from guidelab.training.loop import use_prefetch
from guidelab.training.prefetch import PREFETCH_MIN_SAMPLES, Prefetcher, SplitLoss
from guidelab.training.toy import ToyLoss, toy_loss

TINY = dict(batch=128, hidden=16, depth=2, lr_ref_steps=8, snapshot_every=8)


def test_batches_equal_the_in_process_ones_in_order():
    loss = ToyLoss(ToyConfig(**TINY))
    from guidelab.training import step_generator

    with Prefetcher(loss, seed=3, batch=64, start=5, stop=9) as pre:
        for step in range(5, 9):
            got, want = pre.get(step), loss.data(64, step_generator(3, step))
            assert len(got) == 3 and all(torch.equal(g, w) for g, w in zip(got, want))
        with pytest.raises(GuidelabError, match="in order"):
            pre.get(4)
    with Prefetcher(loss, seed=3, batch=64, start=0, stop=1) as pre:  # the worker ends right after its only batch
        assert torch.equal(pre.get(0)[2], loss.data(64, step_generator(3, 0))[2])


@dataclass
class _FailsAfter:
    """A split loss whose data raises on its ``n``-th call (calls are counted in the worker's copy)."""

    n: int
    calls: int = 0

    def data(self, batch, gen):
        self.calls += 1
        if self.calls > self.n:
            raise RuntimeError("broken data")
        return (torch.randn(batch, 2, generator=gen),)

    def loss(self, net, x):
        return (net(x, torch.ones(len(x))) - x).square().mean(1)

    def __call__(self, net, batch, gen):
        return self.loss(net, *self.data(batch, gen))


def test_a_failing_worker_raises_instead_of_hanging():
    assert isinstance(_FailsAfter(2), SplitLoss)
    with Prefetcher(_FailsAfter(2), seed=0, batch=8, start=0, stop=10) as pre:
        pre.get(0), pre.get(1)
        with pytest.raises(GuidelabError, match="prefetch worker stopped .* before step 2.*prefetch=False"):
            pre.get(2)


def test_auto_prefetch_needs_a_free_core_a_split_loss_and_a_long_run(monkeypatch):
    import guidelab.threads

    loop = LoopConfig(iters=1024, batch=4096)
    loss = toy_loss(ToyConfig())
    big = PREFETCH_MIN_SAMPLES // loop.batch
    monkeypatch.setattr(guidelab.threads, "available_cores", lambda: 2)
    monkeypatch.delenv("GUIDELAB_PREFETCH", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert use_prefetch(None, loss, loop, "cpu", big)
        assert not use_prefetch(None, loss, loop, "cpu", big - 1)  # too short to pay for the worker's start
        assert not use_prefetch(None, lambda net, b, g: None, loop, "cpu", big)  # no separate data part
        assert not use_prefetch(None, loss, loop, "cuda", big)
        monkeypatch.setenv("GUIDELAB_PREFETCH", "0")
        assert not use_prefetch(None, loss, loop, "cpu", big)
        monkeypatch.delenv("GUIDELAB_PREFETCH")
        torch.set_num_threads(2)  # no core left for the worker
        assert not use_prefetch(None, loss, loop, "cpu", big)
        assert use_prefetch(True, loss, loop, "cpu", 1) and not use_prefetch(False, loss, loop, "cpu", big)
    finally:
        torch.set_num_threads(before)


def test_prefetch_misuse_is_refused():
    loop = LoopConfig(iters=8, batch=16)
    with pytest.raises(GuidelabError, match="SplitLoss"):
        use_prefetch(True, lambda net, b, g: None, loop, "cpu", 8)
    with pytest.raises(GuidelabError, match="on the CPU.*'cuda'"):
        use_prefetch(True, toy_loss(ToyConfig()), loop, "cuda", 8)
    with pytest.raises(GuidelabError, match="prefetch must be True, False or None"):
        use_prefetch("yes", toy_loss(ToyConfig()), loop, "cpu", 8)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_worker_exits_when_its_parent_is_killed():
    import os
    import signal
    import subprocess
    import time

    code = (
        "import time; from guidelab.training.prefetch import Prefetcher; from guidelab.training.toy import ToyLoss, ToyConfig\n"
        "pre = Prefetcher(ToyLoss(ToyConfig(batch=64)), seed=0, batch=64, start=0, stop=10**6)\n"
        "pre.get(0); print(pre._proc.pid, flush=True); time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                return "\tZ" not in next(line for line in f if line.startswith("State:"))
        except FileNotFoundError:
            return False

    deadline = time.time() + 30
    while alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    if alive(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the prefetch worker outlived its killed parent by 30 s")
