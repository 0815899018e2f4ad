"""Autoguidance without a second network: the guide is the main network with some blocks skipped or
with dropout on them (the "AutoGuidance" guider of diffusers, which does this with layer-skip hooks).

``D = D_guide + w (D_main - D_guide)`` (``w = 1``: no guidance, the main network alone, bit for bit).
Main and guide are rows of **one** network call: the guide rows are marked by a conditioning key
(:data:`KEY`, one int64 per row: 0 = main row, otherwise the row's dropout seed) that a forward
pre-hook on the network removes before the network sees its conditioning; forward hooks on the
selected blocks then change only the marked rows. Every hook exists only for the duration of one call
(removed in ``finally``), so the network is left exactly as it was.

What "a block" is, per network family (:func:`blocks`):

* ``PixelMLP``: residual block ``i`` (``h += W2 SiLU(W1 LN(h) + A emb)``); skipped = its residual branch
  (``fc2[i]``'s output) is zero, i.e. ``h`` passes unchanged.
* ``UNet`` (guidelab's) and ``EDM2``: the residual blocks whose input and output shapes agree; skipped =
  output := input.
* ``ToyMLP``: the hidden ``hidden -> hidden`` layers; skipped = output := input.

``mode="dropout"``: dropout with probability ``p`` on the selected blocks' outputs (PixelMLP: on the
residual branch), scaled by ``1 / (1 - p)`` as ``torch.nn.functional.dropout`` in training mode does
(diffusers applies ``F.dropout(output, p)`` to the whole block output; ``p = 1`` is its skip). The mask of
a guide row is drawn from that row's seed (the sampler run's per-sample seed, the noise level and the
block), so a sample never depends on the batch it is in.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import GuidelabError, check
from ._base import Branch, Guided, PerCall, draw_seeds, per_sample_seeds
from .protocols import Run
from .weight_schedule import Weight

#: Conditioning key that marks the guide rows (removed by the network's pre-hook before its forward).
KEY = "_self_guide_rows"

MODES = ("skip", "dropout")


def network_module(den: object) -> nn.Module:
    """The ``nn.Module`` behind ``den``: ``den`` itself, or the ``.net`` of a wrapper (one that counts or
    chunks calls), unwrapped repeatedly. A GuidelabError if there is none."""
    seen = 0
    while not isinstance(den, nn.Module):
        inner = vars(den).get("net") if hasattr(den, "__dict__") else None
        check(
            inner is not None and seen < 8,
            f"a guide made from the network itself needs a torch network, got {type(den).__name__}",
        )
        den, seen = inner, seen + 1
    return den


def blocks(net: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``name -> (module, kind)`` of the blocks a self-guide can skip; kind ``"branch"`` (a residual branch:
    skipped = zero output) or ``"block"`` (skipped = output := input)."""
    kind = type(net).__name__
    if kind == "PixelMLP":
        return {str(i): (m, "branch") for i, m in enumerate(net.fc2)}  # type: ignore[arg-type]
    if kind == "ToyMLP":
        return {str(i): (m, "block") for i, m in enumerate(list(net.layers)[1:])}  # type: ignore[arg-type]
    if kind == "UNet" and hasattr(net, "mid"):
        out = {}
        for part in ("enc", "mid", "dec"):
            for i, m in enumerate(getattr(net, part)):
                if type(m).__name__ == "_ResBlock" and isinstance(m.skip, nn.Identity) and m.attn is None:
                    out[f"{part}.{i}"] = (m, "block")
        return out
    if kind == "EDM2":
        out = {}
        for part in ("enc", "dec"):
            for name, m in getattr(net.unet, part).items():
                if type(m).__name__ == "Block" and m.conv_skip is None and m.resample_mode == "keep" and not m.num_heads:
                    if part == "enc" or "block" not in name:  # decoder blocks take the concatenated skip input
                        out[f"{part}.{name}"] = (m, "block")
        return out
    raise GuidelabError(f"self-guidance (skip / dropout) supports PixelMLP, UNet, EDM2 and ToyMLP networks, got {kind}")


def default_blocks(net: nn.Module) -> tuple[str, ...]:
    """The middle block (PixelMLP, ToyMLP) or the innermost ones (UNet: mid; EDM2: the lowest resolution)."""
    names = list(blocks(net))
    check(bool(names), f"{type(net).__name__} has no block a self-guide can skip")
    kind = type(net).__name__
    if kind == "UNet":
        mids = [n for n in names if n.startswith("mid.")]
        return tuple(mids or names[len(names) // 2 : len(names) // 2 + 1])
    if kind == "EDM2":
        low = min(int(n.split(".")[1].split("x")[0]) for n in names)
        return tuple(n for n in names if n.split(".")[1].startswith(f"{low}x"))
    return (names[len(names) // 2],)


class _Marked:
    """The network, whose rows marked in ``cond[KEY]`` run with the selected blocks skipped / dropped."""

    def __init__(self, den: Callable[..., torch.Tensor], net: nn.Module, chosen: Sequence[str], mode: str, p: float) -> None:
        table = blocks(net)
        unknown = [b for b in chosen if b not in table]
        check(not unknown, f"unknown block(s) {unknown} of {type(net).__name__}; allowed: {', '.join(table) or 'none'}")
        self.den, self.net, self.mode, self.p = den, net, mode, p
        self.chosen = [(i, table[b]) for i, b in enumerate(chosen)]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        rows = cond.pop(KEY, None)
        if rows is None or not bool((rows != 0).any()):
            return self.den(x, sigma, **cond)  # no guide row: the untouched network
        state: dict[str, Any] = {}

        def pre(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:  # the network's forward (any chunking wrapper already sliced the rows)
            state["rows"] = kwargs.pop(KEY)
            return args, kwargs

        handles = [self.net.register_forward_pre_hook(pre, with_kwargs=True)]
        try:
            for index, (module, kind) in self.chosen:
                handles.append(module.register_forward_hook(self._hook(state, index, kind)))
            return self.den(x, sigma, **cond, **{KEY: rows})
        finally:
            for h in handles:
                h.remove()

    def _hook(
        self, state: dict[str, Any], index: int, kind: str
    ) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor | None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            rows = state["rows"]
            marked = rows != 0
            if not bool(marked.any()):
                return None
            shape = (-1,) + (1,) * (output.ndim - 1)
            if self.mode == "skip":
                alt = torch.zeros_like(output) if kind == "branch" else args[0]
                check(
                    alt.shape == output.shape, f"cannot skip a block whose input {list(alt.shape)} != output {list(output.shape)}"
                )
            else:
                keep = torch.ones_like(output)
                for r in marked.nonzero().flatten().tolist():
                    g = torch.Generator().manual_seed((int(rows[r]) * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)
                    m = torch.rand(output.shape[1:], generator=g, dtype=torch.float64) >= self.p
                    keep[r] = m.to(output) / (1 - self.p)
                alt = output * keep
            return torch.where(marked.reshape(shape), alt, output)

        return hook


def self_guidance(
    denoiser: Callable[..., torch.Tensor],
    w: Weight,
    *,
    blocks: Sequence[str] | None = None,
    mode: str = "skip",
    p: float = 0.1,
    seeds: Sequence[int] | None = None,
) -> Guided:
    """Autoguidance whose guide is ``denoiser``'s own network with ``blocks`` skipped (``mode="skip"``) or
    with dropout ``p`` on them (``mode="dropout"``); see the module docstring. ``blocks``: names from
    :func:`blocks` (default :func:`default_blocks`); ``seeds``: per-sample seeds of the dropout masks
    (default: the sampler run's). One network call per evaluation (main and guide rows batched).
    """
    check(mode in MODES, f"self-guidance mode must be one of {', '.join(MODES)}, got {mode!r}")
    check(
        mode == "skip" or (isinstance(p, (int, float)) and 0 < p < 1 and math.isfinite(p)),
        f"dropout p must be in (0, 1), got {p!r}",
    )
    net = network_module(denoiser)
    chosen = tuple(blocks) if blocks else default_blocks(net)
    marked = _Marked(denoiser, net, chosen, mode, float(p))

    def main_rows(old: Any, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def guide_rows(old: Any, x: torch.Tensor, sigma: torch.Tensor, run: Run | None) -> torch.Tensor:
        s = draw_seeds(seeds, run)
        if s is None or mode == "skip":
            vals = torch.randint(1, 2**62, (x.shape[0],)) if mode == "dropout" else torch.ones(x.shape[0], dtype=torch.long)
        else:
            vals = torch.tensor([v | 1 for v in per_sample_seeds(s, sigma, 0x5E1F)], dtype=torch.long)  # never 0
        return vals.to(x.device)

    name = "autoguidance_skip" if mode == "skip" else "autoguidance_dropout"
    return Guided(Branch(marked, {KEY: PerCall(main_rows)}), Branch(marked, {KEY: PerCall(guide_rows, with_run=True)}), w, name)
