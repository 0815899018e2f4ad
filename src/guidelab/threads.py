"""How many CPU threads torch uses: one per process for small models (torch's default of one per core
is many times slower on a busy machine), the machine's free cores for large ones.

The CLI calls :func:`choose_threads` and :func:`set_threads` (``--threads``); library code that must be
reproducible across machines runs under :func:`threads` (e.g. the digits classifier's training).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from .errors import check
from .log import get_logger

log = get_logger(__name__)
#: Models with at most this many parameters run on one thread per process (their matrix products are
#: too small to gain from more; under load extra threads only wait for each other).
SMALL_MODEL = 5_000_000


def available_cores() -> int:
    """CPU cores this process may run on (affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def choose_threads(requested: int | None = None, *, parameters: int | None = None, processes: int = 1) -> tuple[int, str]:
    """``(n, why)``: ``requested`` when given (>= 1); else 1 for a model of at most :data:`SMALL_MODEL`
    ``parameters`` (or unknown size), else ``available_cores() // processes``."""
    if requested is not None:
        check(
            isinstance(requested, int) and not isinstance(requested, bool) and requested >= 1,
            f"threads must be an integer >= 1, got {requested!r}",
        )
        return requested, "asked for"
    check(processes >= 1, f"processes must be >= 1, got {processes!r}")
    if parameters is None or parameters <= SMALL_MODEL:
        size = "unknown size" if parameters is None else f"{parameters:,} parameters"
        return 1, f"small model ({size}): one thread per process"
    n = max(1, available_cores() // processes)
    return n, f"{parameters:,} parameters: {available_cores()} cores / {processes} process(es)"


def set_threads(requested: int | None = None, *, parameters: int | None = None, processes: int = 1) -> int:
    """Choose (:func:`choose_threads`), apply with ``torch.set_num_threads`` and log the choice."""
    n, why = choose_threads(requested, parameters=parameters, processes=processes)
    torch.set_num_threads(n)
    log.info("using %d CPU thread%s (%s)", n, "" if n == 1 else "s", why)
    return n


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count after."""
    check(isinstance(n, int) and n >= 1, f"threads must be an integer >= 1, got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
