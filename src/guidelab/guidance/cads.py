"""Condition-annealed sampling (CADS); the method's documentation is :func:`cads`'s docstring."""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterator, Sequence, cast

import torch
import torch.nn.functional as F

from ..errors import GuidelabError, check
from ._base import draw_normal, draw_seeds
from .protocols import Guider, Run

_SALT = 0xCAD5
#: conditioning key carrying [batch, 2 (K + 1)]: each sample's one-hot label and its annealed version, read
#: (and removed) by a forward pre-hook on the network; integer labels only
SOFT = "_cads_soft_label"


def _label_net(guider: object) -> torch.nn.Module | None:
    """The guidelab image network (PixelMLP, UNet: a label one-hot at the end of its embedding layer's
    input, scaled by sqrt(K + 1)) behind ``guider``'s main branch (or its wrappers' ``.net``), or None."""
    net = getattr(getattr(guider, "main", None), "denoiser", guider)
    for _ in range(8):  # the network behind counting / chunking wrappers (their ``.net``)
        if isinstance(net, torch.nn.Module) or not hasattr(net, "__dict__") or vars(net).get("net") is None:
            break
        net = vars(net)["net"]
    if isinstance(net, torch.nn.Module) and getattr(net, "emb_layer", None) is not None and getattr(net, "num_classes", None):
        return net
    return None


@contextlib.contextmanager
def _annealed_labels(net: torch.nn.Module) -> Iterator[None]:
    """While active, rows of ``net``'s calls whose label is still their sample's own get the annealed one-hot
    (from ``cond[SOFT]``) in the embedding layer's label columns; other rows (the null, a negative) keep
    theirs. Hooks exist only inside the block."""
    state: dict[str, torch.Tensor] = {}

    def pre(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        both = kwargs.pop(SOFT)
        k1 = both.shape[1] // 2
        label = kwargs.get("label")
        label = torch.full(both.shape[:1], k1 - 1, device=both.device) if label is None else torch.as_tensor(label)
        label = label.expand(both.shape[0]) if label.ndim == 0 else label
        own = (F.one_hot(label.long(), k1).to(both) == both[:, :k1]).all(1)
        state["rows"], state["soft"] = own, both[:, k1:]
        return args, kwargs

    def emb_pre(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor] | None:
        rows, soft = state["rows"], state["soft"]
        if not bool(rows.any()):
            return None
        (inp,) = args
        k1 = soft.shape[1]
        inp = inp.clone()
        inp[rows, -k1:] = soft[rows].to(inp) * math.sqrt(k1)  # as the network's own one-hot * sqrt(K + 1)
        return (inp,)

    emb_layer = cast(torch.nn.Module, net.emb_layer)  # a label network's embedding layer (see _label_net)
    handles = [net.register_forward_pre_hook(pre, with_kwargs=True), emb_layer.register_forward_pre_hook(emb_pre)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def gamma(t: float, tau1: float, tau2: float) -> float:
    """CADS eq. 4: 1 for t <= tau1, 0 for t >= tau2, linear in between (t = 1: pure noise)."""
    return 1.0 if t <= tau1 else 0.0 if t >= tau2 else (tau2 - t) / (tau2 - tau1)


class CADS(Guider):
    """``guider`` called with an annealed condition under ``key``; see :func:`cads`."""

    run: Run | None = None

    def __init__(
        self,
        guider: Callable[..., torch.Tensor],
        key: str,
        tau1: float,
        tau2: float,
        noise_scale: float,
        psi: float | None,
        seeds: Sequence[int] | None,
    ) -> None:
        self.guider, self.key, self.tau1, self.tau2, self.net = guider, key, tau1, tau2, _label_net(guider)
        self.noise_scale, self.psi, self.seeds = noise_scale, psi, seeds
        self.name, self.requires = f"cads[{getattr(guider, 'name', 'denoiser')}]", getattr(guider, "requires", frozenset())

    def anneal(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.run is None:
            raise GuidelabError(
                "cads anneals over the sampler run's steps: call it through a sampler or bind it "
                "with .start(guidance.Run(x, sigmas))"
            )
        t = 1 - self.run.step / (len(self.run.sigmas) - 1)  # normalised time, 1 at the first step
        g = gamma(t, self.tau1, self.tau2)
        if g == 1:
            return y
        n = draw_normal(draw_seeds(self.seeds, self.run), sigma, y.shape[1:], _SALT, y)
        y_hat = math.sqrt(g) * y + self.noise_scale * math.sqrt(1 - g) * n  # eq. 3
        if self.psi is None:
            return y_hat
        dims = tuple(range(1, y.ndim))
        scaled = (y_hat - y_hat.mean(dims, keepdim=True)) / y_hat.std(dims, keepdim=True) * y.std(dims, keepdim=True) + y.mean(
            dims, keepdim=True
        )  # eq. 5
        return self.psi * scaled + (1 - self.psi) * y_hat  # eq. 6

    def _cond(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> dict[str, Any]:
        y = cond.get(self.key)
        if isinstance(y, torch.Tensor) and not y.is_floating_point() and not y.is_complex() and self.net is not None:
            onehot = F.one_hot(y.long().expand(x.shape[0]) if y.ndim == 0 else y.long(), cast(int, self.net.num_classes) + 1).to(
                x
            )
            soft = self.anneal(onehot, sigma)
            return cond if soft is onehot else {**cond, SOFT: torch.cat([onehot, soft], 1)}
        if not (isinstance(y, torch.Tensor) and y.is_floating_point()):
            raise GuidelabError(
                f"cads needs a continuous condition (a float tensor) under {self.key!r}, or integer labels of a "
                f"guidelab image network (PixelMLP, UNet), got {type(y).__name__}"
                + (f" {y.dtype}" if isinstance(y, torch.Tensor) else "")
            )
        return {**cond, self.key: self.anneal(y, sigma)}

    def _call(self, fn: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        cond = self._cond(x, sigma, cond)
        if SOFT not in cond:
            return fn(x, sigma, **cond)
        assert self.net is not None  # _cond sets SOFT only for a label network
        with _annealed_labels(self.net):
            return fn(x, sigma, **cond)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self._call(self.guider, x, sigma, cond)

    def unguided(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self._call(getattr(self.guider, "unguided", self.guider), x, sigma, cond)

    def start(self, run: Run) -> "CADS":
        new = copy.copy(self)
        new.run = run
        new.guider = self.guider.start(run) if isinstance(self.guider, Guider) else self.guider
        return new


def cads(
    guider: Callable[..., torch.Tensor],
    *,
    key: str | None = None,
    tau1: float = 0.6,
    tau2: float = 0.9,
    noise_scale: float = 0.25,
    psi: float | None = 1.0,
    seeds: Sequence[int] | None = None,
) -> CADS:
    """CADS, condition-annealed diffusion sampling (Sadat et al., ICLR 2024, arXiv 2310.17347, eqs. 3-6):
    a guider (cfg, autoguidance, ...; the null branch keeps its null condition) or a plain denoiser
    called with a noisy condition early in the run::

        y_hat = sqrt(gamma(t)) y + s sqrt(1 - gamma(t)) n,      n ~ N(0, I) fresh at every call
        y_hat <- psi rescale(y_hat) + (1 - psi) y_hat,          rescale: y_hat's mean / std set to y's

    ``t = 1 - i / N`` the run's normalised time at step ``i`` of ``N``; ``gamma`` (eq. 4) is 1 for
    ``t <= tau1``, 0 for ``t >= tau2``, linear between. ``key``: a float embedding (default: the
    denoiser's ``condition.key``), or integer labels of a guidelab image network (PixelMLP, UNet): then
    ``y`` is the label's one-hot, annealed inside the network's embedding layer (as the paper's class
    embeddings); rows whose label is not the sample's own (the null branch, a Perp-Neg negative) keep theirs.
    Mean / std per sample (the official code uses the whole batch).
    Noise per sample from ``seeds`` or the run's seeds. ``tau1 >= 1``: the guider itself, bit for bit.
    Paper defaults tau1 0.6, tau2 0.9, s 0.25, psi 1.
    """
    check(0 <= tau1 < tau2 or tau1 >= 1, f"cads needs 0 <= tau1 < tau2, got tau1={tau1}, tau2={tau2}")
    check(
        noise_scale >= 0 and (psi is None or 0 <= psi <= 1),
        f"cads needs noise_scale >= 0 and psi in [0, 1], got {noise_scale}, {psi}",
    )
    if key is None:
        base = getattr(guider, "main", None)
        condition = getattr(getattr(base, "denoiser", guider), "condition", None)
        key = condition.key if condition is not None else "label"
    return CADS(guider, key, float(tau1), float(tau2), float(noise_scale), psi, seeds)
