"""Samplers: plain functions ``sampler(denoiser, x, sigmas, *, cond, callback, progress, ...) -> x``.

``x`` is the starting sample at ``sigmas[0]``; ``sigmas`` decrease strictly and end in 0.
"""

from __future__ import annotations

from ..errors import GuidelabError
from .edm import euler, heun

_REGISTRY = {"euler": euler, "heun": heun}


def names() -> list[str]:
    """Names of all samplers, usable with :func:`get`."""
    return sorted(_REGISTRY)


def get(name: str):
    """The sampler called ``name``; a clear error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise GuidelabError(f"unknown sampler {name!r}; known samplers: {', '.join(names())}") from None


__all__ = ["euler", "heun", "get", "names"]
