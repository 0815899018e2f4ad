"""Autoguidance with a cheaper copy of the main network as the guide: its weights rounded to a lower
precision (bf16 / fp16) or magnitude-pruned. (The third cheap guide, a post-hoc EMA reconstruction of the
same run at an earlier step or another sigma_rel, needs no code here: ``--guide RUN --guide-step N
--guide-sigma-rel S`` of plain autoguidance, :mod:`guidelab.training.phema`.)

``D = D_copy + w (D_main - D_copy)``; ``w = 1``: the main network alone, bit for bit. The copy has other
weights, so main and guide are two network calls. The copy keeps the main network's dtype for its
computation: ``lowp`` emulates storing the weights in bf16 / fp16 (each weight rounded to the nearest
representable value); ``pruned`` zeroes, in every weight matrix / convolution kernel (ndim >= 2), the
``fraction`` of entries with the smallest magnitude (biases, norms and gains are kept).

The copy is made once per (network, kind, setting) and reused while the network's parameters are
unchanged (a parameter's in-place version counter invalidates it).
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import Any, Callable

import torch
from torch import nn

from ..errors import check
from ._base import Branch, Guided
from .self_guide import network_module
from .weight_schedule import Weight

DTYPES = ("bf16", "fp16")
_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _version(net: nn.Module) -> tuple[int, ...]:
    return tuple(p._version for p in net.parameters())


def lowp_copy(net: nn.Module, dtype: str = "bf16") -> nn.Module:
    """A copy of ``net`` whose floating-point parameters are rounded to ``dtype`` (bf16 or fp16) and cast back."""
    check(dtype in DTYPES, f"lower-precision guide dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = copy.deepcopy(net)
    with torch.no_grad():
        for p in out.parameters():
            if p.is_floating_point():
                p.copy_(p.to(_TORCH[dtype]).to(p.dtype))
    return out


def pruned_copy(net: nn.Module, fraction: float = 0.3) -> nn.Module:
    """A copy of ``net`` with the ``fraction`` smallest-magnitude entries of each weight tensor (ndim >= 2) zeroed."""
    check(
        isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 < fraction < 1,
        f"pruning fraction must be in (0, 1), got {fraction!r}",
    )
    out = copy.deepcopy(net)
    with torch.no_grad():
        for p in out.parameters():
            if p.ndim >= 2 and p.is_floating_point():
                k = int(round(fraction * p.numel()))
                if k:
                    idx = p.abs().flatten().argsort(stable=True)[:k]  # ties: the first in memory order
                    p.view(-1)[idx] = 0
    return out


def _cached(net: nn.Module, key: tuple[Any, ...], make: Callable[[], nn.Module]) -> nn.Module:
    entry = _CACHE.setdefault(net, {})
    version = _version(net)
    hit = entry.get(key)
    if hit is None or hit[0] != version:
        hit = entry[key] = (version, make())
    return hit[1]


def _with_net(den: Callable[..., torch.Tensor], new: nn.Module) -> Callable[..., torch.Tensor]:
    """``den`` with its network replaced by ``new``: ``new`` itself, or a shallow copy of a wrapper (a
    counting / chunking one, which keeps counting the copy's rows) around it."""
    if isinstance(den, nn.Module):
        return new
    out = object.__new__(type(den))  # not copy.copy: a forwarding __getattr__ would recurse on the bare object
    vars(out).update(vars(den))
    vars(out)["net"] = _with_net(vars(den)["net"], new)
    return out


def weak_copy_guide(
    denoiser: Callable[..., torch.Tensor], kind: str, *, dtype: str = "bf16", fraction: float = 0.3
) -> Callable[..., torch.Tensor]:
    """The guide denoiser: ``denoiser`` with its network replaced by a ``kind`` copy (``"lowp"``, ``"pruned"``)."""
    check(kind in ("lowp", "pruned"), f"weak copy kind must be lowp or pruned, got {kind!r}")
    net = network_module(denoiser)
    if kind == "lowp":
        check(dtype in DTYPES, f"lower-precision guide dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        new = _cached(net, ("lowp", dtype), lambda: lowp_copy(net, dtype))
    else:
        pruned_copy(nn.Identity(), fraction)  # checks the fraction before any copy is made
        new = _cached(net, ("pruned", float(fraction)), lambda: pruned_copy(net, fraction))
    return _with_net(denoiser, new)


def lowp_autoguidance(denoiser: Callable[..., torch.Tensor], w: Weight, *, dtype: str = "bf16") -> Guided:
    """Autoguidance with ``denoiser``'s own weights rounded to ``dtype`` as the guide (see module docstring)."""
    return Guided(Branch(denoiser), Branch(weak_copy_guide(denoiser, "lowp", dtype=dtype)), w, "autoguidance_lowp")


def pruned_autoguidance(denoiser: Callable[..., torch.Tensor], w: Weight, *, fraction: float = 0.3) -> Guided:
    """Autoguidance with ``denoiser``'s magnitude-pruned copy (``fraction`` of each weight tensor) as the guide."""
    return Guided(Branch(denoiser), Branch(weak_copy_guide(denoiser, "pruned", fraction=fraction)), w, "autoguidance_pruned")
