"""Fused element-wise kernels: a chain of element-wise ops compiled into one loop by ``torch.compile``
(Inductor, which needs a C++ compiler at run time), with the plain-torch function as the fallback.

On a CPU a chain of k element-wise ops costs k passes over memory and k dispatches; fused it is one pass.
Used where such a chain is the cost: the toy recipe's exact score (``GaussianMixture.score_fast(fused=True)``).
A fused kernel equals its plain function to float rounding, not bit for bit; each is deterministic and
gives the same bits whatever the thread count (its reductions run within a row). ``GUIDELAB_FUSE=0`` turns
fusion off everywhere (``fuse=None`` then means plain torch), e.g. to compare with a machine without a
compiler.
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Any, Callable

from .errors import GuidelabError
from .log import get_logger

log = get_logger(__name__)
ENV = "GUIDELAB_FUSE"


@functools.cache
def compiler() -> str | None:
    """The C++ compiler Inductor would run (its ``cpp.cxx`` setting, ``$CXX`` or ``g++``), or None if
    none is on the PATH or ``torch.compile`` is not usable here."""
    try:
        import torch._inductor.config as cfg
    except Exception:  # a torch build without Inductor
        return None
    names = [c for c in cfg.cpp.cxx if c] or ["g++"]
    found = [shutil.which(n) for n in [os.environ.get("CXX", ""), *names] if n]
    return next((f for f in found if f), None)


def resolve(fuse: bool | None, *, worth: bool = True) -> bool:
    """Whether to fuse: ``fuse`` when given (True raises if no compiler is found); ``None`` (auto) fuses
    when a compiler is found, ``GUIDELAB_FUSE`` is not ``0`` and the work is ``worth`` a first compile
    (~5-15 s; later processes load it from Inductor's cache)."""
    if fuse is not None and not isinstance(fuse, bool):
        raise GuidelabError(f"fuse must be True, False or None (auto), got {fuse!r}")
    if fuse is False:
        return False
    if fuse is None and (os.environ.get(ENV, "1") == "0" or not worth):
        return False
    if compiler() is None:
        if fuse:
            raise GuidelabError("fused kernels need torch.compile with a C++ compiler (g++ or $CXX) on the PATH; none found")
        return False
    return True


class Kernel:
    """``fn`` compiled on first call (``torch.compile(fn, dynamic=True, fullgraph=True)``: one compile for
    every shape). If compiling fails, a warning is logged once and ``fn`` runs as plain torch from then on."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.name = fn, getattr(fn, "__qualname__", repr(fn))
        self._compiled: Callable[..., Any] | None = None
        self.failed: str | None = None  # why compiling failed, once it has

    def __call__(self, *args: Any) -> Any:
        if self.failed is not None:
            return self.fn(*args)
        if self._compiled is None:
            import torch

            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            return self._compiled(*args)
        except Exception as e:  # no working compiler, an Inductor bug: the plain function gives the same values
            self.failed = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            log.warning("fused kernel %s could not be compiled (%s); running it as plain torch", self.name, self.failed)
            return self.fn(*args)
