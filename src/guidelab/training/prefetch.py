"""A training run's batches computed in a second process, a few steps ahead of the optimiser.

A loss whose batch does not depend on the network (the toy recipe: exact noisy samples and their exact
score) splits into ``data(batch, generator) -> tensors`` and ``loss(net, *tensors)``
(:class:`SplitLoss`). Since step ``i``'s randomness comes from ``step_generator(seed, i)`` alone, a worker
process can compute the data of steps ``i + 1, i + 2, ...`` while this process runs step ``i``'s network:
the same operations on the same thread count, so the run's weights are bit-identical to computing
everything in one process (tests/training/test_loop.py). On a 2-core machine the toy's main model
trains ~1.5x faster (its exact score is a third of a step; docs/BENCHMARKS.md).

The worker's results travel through a ring of shared-memory tensors (allocated once by the worker, after its
first batch); only slot numbers cross the queues afterwards. The worker exits when told, when its parent is
gone, or with its parent (a daemon process).
"""

from __future__ import annotations

import os
import queue
from typing import Any, Protocol, runtime_checkable

import torch
import torch.multiprocessing as mp

from ..errors import GuidelabError
from ..rng import step_generator

#: Batches the worker may be ahead of the optimiser (a buffer against scheduling jitter on a busy machine).
DEPTH = 8
#: ``prefetch=None`` (auto) uses a worker for runs of at least this many samples left (steps x batch): 512
#: steps at batch 4096, where the ~14 ms saved per toy step outweighs the worker's start (~2-4 s).
PREFETCH_MIN_SAMPLES = 2**21


def spare_core_pays(samples: int) -> bool:
    """Whether a second process of this process's thread count has a core of its own (twice the threads fit the
    cores) and ``samples`` (training samples it would take on) pay for its start; ``GUIDELAB_PREFETCH=0``: never."""
    from ..threads import available_cores

    return (
        os.environ.get("GUIDELAB_PREFETCH", "1") != "0"
        and 2 * torch.get_num_threads() <= available_cores()
        and samples >= PREFETCH_MIN_SAMPLES
    )


@runtime_checkable
class SplitLoss(Protocol):
    """A loss whose batch is independent of the network: ``loss(net, *data(batch, gen))`` is the per-sample
    loss, and ``self(net, batch, gen)`` computes both in one go. Picklable (the worker rebuilds it)."""

    def data(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]: ...

    def loss(self, net: torch.nn.Module, *data: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, net: torch.nn.Module, batch: int, gen: torch.Generator) -> torch.Tensor: ...


def _work(loss_fn: SplitLoss, seed: int, batch: int, start: int, stop: int, threads: int, free: Any, full: Any) -> None:
    torch.set_num_threads(threads)
    parent = os.getppid()
    slots: list[tuple[torch.Tensor, ...]] = []
    for step in range(start, stop):
        out = loss_fn.data(batch, step_generator(seed, step))
        if not slots:  # the ring, shaped like the first batch; sent once (the parent then frees its slots)
            slots = [tuple(torch.empty_like(t).share_memory_() for t in out) for _ in range(DEPTH)]
            full.put(("slots", slots))
        while True:
            try:
                i = free.get(timeout=1.0)
                break
            except queue.Empty:
                if os.getppid() != parent:
                    return  # the parent is gone
        if i is None:
            return  # told to stop
        for dst, src in zip(slots[i], out):
            dst.copy_(src)
        full.put((step, i))


class Prefetcher:
    """Computes ``loss_fn.data`` of steps ``start .. stop - 1`` in a worker process; :meth:`get` returns them in
    order (copies: the caller may keep them). Use as a context manager, or call :meth:`close`."""

    def __init__(self, loss_fn: SplitLoss, *, seed: int, batch: int, start: int, stop: int, threads: int = 1) -> None:
        # fork where there is one (as torch's DataLoader): no re-import of the caller's script, no pickling
        ctx: Any = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self._free, self._full = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(
            target=_work,
            args=(loss_fn, seed, batch, start, stop, threads, self._free, self._full),
            daemon=True,
            name="guidelab-prefetch",
        )
        self._proc.start()
        self._slots: list[tuple[torch.Tensor, ...]] | None = None
        self._next = start

    def _take(self) -> Any:
        while True:
            try:
                return self._full.get(timeout=1.0)
            except queue.Empty:
                if not self._proc.is_alive():
                    raise GuidelabError(
                        f"the batch-prefetch worker stopped (exit code {self._proc.exitcode}) before step {self._next}; "
                        "its error is printed above; train without it: prefetch=False (GUIDELAB_PREFETCH=0)"
                    ) from None

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        """The data of ``step`` (the steps must be asked for in order)."""
        if step != self._next:
            raise GuidelabError(f"prefetched batches come in order: expected step {self._next}, got {step}")
        if self._slots is None:  # the worker waits for these frees, so it is alive while its memory is received
            _, self._slots = self._take()
            for i in range(len(self._slots)):
                self._free.put(i)
        got, i = self._take()
        if got != step:  # cannot happen: one producer, one consumer, in order
            raise GuidelabError(f"prefetch worker sent step {got} for step {step}")
        out = tuple(t.clone() for t in self._slots[i])
        self._free.put(i)
        self._next += 1
        return out

    def close(self) -> None:
        if self._proc.is_alive():
            self._free.put(None)
            self._proc.join(timeout=5.0)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join()
        for q in (self._free, self._full):
            q.cancel_join_thread()
            q.close()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
