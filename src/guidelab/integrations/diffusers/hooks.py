"""Row-marking hooks: perturb the attention (PAG, SEG, SLG) or the time embedding (TSG) of the marked rows only.

One network call can then hold the main and the perturbed branch of a guider (rows marked by the ``perturb``
conditioning key of :class:`~guidelab.integrations.diffusers.DiffusersDenoiser`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
import threading
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ...denoisers import bcast
from ...errors import check
from ...guidance.tsg import KEY as OFFSET

#: Layers selected by ``layers=None``, by mode and model family (UNet2DModel / UNet2DConditionModel: "unet"; DiT,
#: PixArt: "transformer"), as diffusers recommends them: PAG "mid" (the SD / SDXL PAG pipelines' ``pag_applied_layers``)
#: and "blocks.1" (the PixArt-Sigma / SD3 / HunyuanDiT PAG pipelines'); SEG "mid" (the official SEG-SDXL code) and
#: SLG / SEG on transformers blocks 7, 8, 9 (diffusers' SkipLayerGuidance and SmoothedEnergyGuidance, recommended
#: for SD3.5 Medium); SLG on UNets "mid" (diffusers recommends none: the middle blocks, by analogy); TSG every time
#: embedder. ``"all"``: every candidate layer.
DEFAULT_LAYERS: dict[str, dict[str, tuple[str, ...]]] = {
    "pag": {"unet": ("mid",), "transformer": ("blocks.1",)},
    "seg": {"unet": ("mid",), "transformer": ("transformer_blocks.7", "transformer_blocks.8", "transformer_blocks.9")},
    "slg": {"unet": ("mid",), "transformer": ("transformer_blocks.7", "transformer_blocks.8", "transformer_blocks.9")},
    "tsg": {"unet": ("all",), "transformer": ("all",)},
}


def _selects(layer: str, name: str) -> bool:
    """``layer`` occurs in the module name ``name``; one ending in a digit not before another digit ("blocks.1"
    selects blocks.1 and blocks.1.attn1, not blocks.10)."""
    return re.search(re.escape(layer) + (r"(?!\d)" if layer[-1:].isdigit() else ""), name) is not None


class Perturbation:
    """What to do to the selected layers of the marked rows.

    * ``"pag"`` (Ahn et al. 2024): self-attention map replaced by the identity, i.e. softmax(QK^T) V -> V;
    * ``"seg"`` (Hong 2024): queries blurred by a Gaussian of std ``blur_sigma`` over the 2-D token grid
      (``inf``: every query replaced by their mean, i.e. uniform attention);
    * ``"slg"`` (skip-layer guidance, SD3.5): the selected blocks are skipped (output = input);
    * ``"tsg"`` (time-step guidance, Sadat et al. 2025): the offset ``noise_embed_offset`` ([B, dim]) is added to
      the output of the time embedding MLP (UNets: ``time_embedding``, ``emb = time_embedding(time_proj(t))``;
      DiT / PixArt: every ``timestep_embedder``), before class / size embeddings are added to it.

    Candidates: self-attentions (PAG/SEG), transformer blocks or, in UNet2DModel, residual attention blocks (SLG),
    time embedders (TSG). ``layers``: substrings of their module names (see :func:`_selects`), ``"all"``, or
    ``None``: :data:`DEFAULT_LAYERS`.
    """

    def __init__(self, mode: str, layers: str | Sequence[str] | None = None, blur_sigma: float = math.inf):
        check(mode in ("pag", "seg", "slg", "tsg"), f"perturbation mode must be 'pag', 'seg', 'slg' or 'tsg', got {mode!r}")
        check(blur_sigma > 0, f"blur_sigma must be > 0, got {blur_sigma}")
        layers = [layers] if isinstance(layers, str) else layers
        check(
            layers is None or (len(layers) > 0 and all(isinstance(s, str) and s for s in layers)),
            f"layers must be module-name substrings, 'all' or None (the defaults), got {layers!r}",
        )
        self.mode, self.layers, self.blur_sigma = mode, None if layers is None else list(layers), blur_sigma
        self._found: tuple = (None, [])  # (model, its modules): searched once

    def modules(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        if self._found[0] is not model:
            self._found = (model, self._search(model))
        return self._found[1]

    def selection(self, model: torch.nn.Module) -> list[str]:
        """The ``layers`` in effect for ``model``: as given, or its family's :data:`DEFAULT_LAYERS`."""
        family = "unet" if type(model).__name__.startswith("UNet") else "transformer"
        return list(DEFAULT_LAYERS[self.mode][family]) if self.layers is None else self.layers

    def _search(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        from diffusers.models.attention_processor import Attention

        if self.mode == "tsg":  # not class_embedding (also a TimestepEmbedding)
            blocks = [(n, m) for n, m in model.named_modules() if n == "time_embedding" or n.endswith("timestep_embedder")]
        elif self.mode == "slg":
            blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("TransformerBlock")]
            if not blocks:  # UNet2DModel: attention with its own residual
                blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and m.residual_connection]
        else:
            blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]
        layers = self.selection(model)
        if layers != ["all"]:
            blocks = [(n, m) for n, m in blocks if any(_selects(s, n) for s in layers)]
        default = " (the default for this model; pass layers=... or 'all')" if self.layers is None else ""
        check(bool(blocks), f"{self.mode}: no layer of {type(model).__name__} matches layers={layers}{default}")
        return blocks

    def embed_dim(self, model: torch.nn.Module) -> int:
        """TSG: size of the time embedding vector the offset is added to (the same for every selected embedder)."""
        # torch types a submodule attribute as Tensor | Module
        dims: set[int] = {m.linear_2.out_features for _, m in self.modules(model) if hasattr(m, "linear_2")}  # type: ignore[union-attr, misc]
        check(
            len(dims) == 1,
            f"tsg: the time embedders of {type(model).__name__} have sizes {sorted(dims)}; "
            "select embedders of one size with layers=...",
        )
        return dims.pop()


def _blur_queries(q: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of queries [B, heads, L, d] over the sqrt(L) x sqrt(L) token grid (SEG)."""
    L = q.shape[-2]
    h = math.isqrt(L)
    check(h * h == L, f"seg needs a square token grid, got {L} tokens")
    r = math.ceil(3 * sigma) if math.isfinite(sigma) else h
    if r >= h:  # wider than the grid: the mean query
        return q.mean(-2, keepdim=True).expand_as(q)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=q.dtype, device=q.device) / sigma) ** 2)
    k = k / k.sum()
    B, H, _, d = q.shape
    g = q.transpose(-1, -2).reshape(B * H * d, 1, h, h)
    g = F.conv2d(F.pad(g, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    g = F.conv2d(F.pad(g, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return g.reshape(B, H, d, L).transpose(-1, -2)


# ---------------------------------------------------------------------------------------------
# Scoped mechanism. The selected modules get, for the duration of a perturbed call, a wrapping attention processor
# (PAG/SEG) or a forward hook (SLG/TSG), installed once however many calls overlap (reference-counted) and removed
# after the last. Both act only where the calling thread's context (a ContextVar, so per thread and per asyncio
# task) holds a scope for that very module: other threads and other models running at the same time are untouched.


@dataclass(frozen=True)
class _Scope:
    """One perturbed call: the mode, the marks [B] as runs of equal marks, TSG's offset [B, dim]."""

    mode: str
    blur_sigma: float
    mask: torch.Tensor
    runs: tuple[tuple[int, int, bool], ...]
    offset: torch.Tensor | None


#: id(module) -> the scope perturbing it, in the current thread / task.
_ACTIVE: ContextVar[dict[int, _Scope] | None] = ContextVar("guidelab_perturbation", default=None)
_LOCK = threading.Lock()
_INSTALLED: dict[tuple[int, str], list] = {}  # (id(module), kind) -> [users, undo]


def _runs(mask: torch.Tensor) -> tuple[tuple[int, int, bool], ...]:
    """Runs of equal marks, e.g. [F, F, T, T] -> (0, 2, False), (2, 4, True)."""
    marks = mask.cpu().tolist()
    starts = [i for i in range(len(marks)) if i == 0 or marks[i] != marks[i - 1]]
    return tuple((i, j, marks[i]) for i, j in zip(starts, starts[1:] + [len(marks)], strict=True))


def _sdpa(scope: _Scope, query, key, value, *args, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the marked rows perturbed; each row's attention computed once, on
    views of the batch (the original one on unmarked rows; PAG's marked rows need none: their output is V)."""
    B = scope.mask.shape[0]
    check(query.shape[0] == B, f"{scope.mode}: attention batch {query.shape[0]} != mask {B}")

    def rows(v, i, j):  # a batch-sized tensor argument, sliced
        return v[i:j] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == B else v

    out = []
    for i, j, perturbed in scope.runs:
        q, k, v = query[i:j], key[i:j], value[i:j]
        a, kw = [rows(x, i, j) for x in args], {n: rows(x, i, j) for n, x in kwargs.items()}
        if not perturbed:
            out.append(F.scaled_dot_product_attention(q, k, v, *a, **kw))
        elif scope.mode == "pag":  # identity attention map: output = V
            check(v.shape[-2] == q.shape[-2], "pag needs self-attention (as many keys as queries)")
            out.append(v)
        else:  # seg: attention of blurred queries
            out.append(F.scaled_dot_product_attention(_blur_queries(q, scope.blur_sigma), k, v, *a, **kw))
    return out[0] if len(out) == 1 else torch.cat(out)


class _PerturbedSDPA(TorchFunctionMode):
    """Inside one selected attention layer, in this thread only: ``F.scaled_dot_product_attention`` -> :func:`_sdpa`."""

    def __init__(self, scope: _Scope):
        super().__init__()
        self.scope, self.calls = scope, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        return _sdpa(self.scope, *args, **kwargs)


class _Processor:
    """Wraps an attention processor; perturbs its attention where the calling context has a scope for the layer."""

    def __init__(self, inner):
        self.inner = inner
        # Attention.forward passes on only the keywords named by inspect.signature(processor.__call__): the inner's
        call = functools.partial(type(self).__call__, self)
        call.__signature__ = inspect.signature(inner.__call__)
        self.__call__ = call

    def __call__(self, attn, hidden_states, *args, **kwargs):
        scope = (_ACTIVE.get() or {}).get(id(attn))
        if scope is None:
            return self.inner(attn, hidden_states, *args, **kwargs)
        mode = _PerturbedSDPA(scope)
        with mode:
            out = self.inner(attn, hidden_states, *args, **kwargs)
        check(
            mode.calls > 0,
            f"{scope.mode}: attention processor {type(self.inner).__name__} does not call "
            "F.scaled_dot_product_attention, so it cannot be perturbed; use AttnProcessor2_0 (diffusers' default)",
        )
        return out


def _hook(module, args, kwargs, output):
    """Forward hook: SLG (output = input) or TSG (output + offset) on the marked rows of the module's scope."""
    scope = (_ACTIVE.get() or {}).get(id(module))
    if scope is None:
        return None
    if scope.mode == "tsg":
        return torch.where(scope.mask.to(output.device)[:, None], output + scope.offset.to(output), output)
    inp = args[0] if args else kwargs["hidden_states"]
    out = output[0] if isinstance(output, tuple) else output
    check(inp.shape == out.shape, f"slg: layer output {list(out.shape)} differs from its input {list(inp.shape)}")
    out = torch.where(bcast(scope.mask.to(out.device), out), inp, out)
    return (out, *output[1:]) if isinstance(output, tuple) else out


def _attach(module: torch.nn.Module, kind: str):
    """Install the wrapper (``kind`` "processor") or the hook ("hook"); returns the function that removes it."""
    if kind == "hook":
        return module.register_forward_hook(_hook, with_kwargs=True).remove
    inner = module.processor
    # diffusers' Attention.set_processor, typed by torch's Module.__getattr__ as Tensor | Module
    module.set_processor(_Processor(inner))  # type: ignore[operator]
    return lambda: module.set_processor(inner)  # type: ignore[operator]


def _acquire(module: torch.nn.Module, kind: str) -> None:
    with _LOCK:
        entry = _INSTALLED.setdefault((id(module), kind), [0, None])
        if entry[0] == 0:
            entry[1] = _attach(module, kind)
        entry[0] += 1


def _release(module: torch.nn.Module, kind: str) -> None:
    with _LOCK:
        entry = _INSTALLED[(id(module), kind)]
        entry[0] -= 1
        if entry[0] == 0:
            del _INSTALLED[(id(module), kind)]
            entry[1]()


@contextlib.contextmanager
def perturbed_attention(
    model: torch.nn.Module, perturbation: Perturbation, mask: torch.Tensor, offset: torch.Tensor | None = None
):
    """Perturb the rows ``mask`` ([B] bool) of every forward call of ``model`` made inside the context, in this
    thread (or asyncio task) only.

    PAG/SEG: the selected attention layers' processors are wrapped; while one runs, a thread-local
    ``TorchFunctionMode`` routes its ``F.scaled_dot_product_attention`` (what diffusers' ``AttnProcessor2_0``
    calls) to a version that perturbs only the marked rows (a processor that never calls it is an error).
    SLG: the selected blocks' output is replaced by their input on those rows. TSG: ``offset`` ([B, dim]) is added
    to the time embedding's output on those rows. The other rows are untouched, so one batched call can hold the
    main and the perturbed branch. Other threads and other models running at the same time are unaffected.
    """
    mods = perturbation.modules(model)
    if perturbation.mode == "tsg":
        check(
            offset is not None and offset.ndim == 2 and offset.shape[0] == mask.shape[0],
            f"tsg needs {OFFSET} [B, dim] next to the perturb marks",
        )
    mask = mask.bool()
    scope = _Scope(perturbation.mode, perturbation.blur_sigma, mask, _runs(mask), offset)
    kind = "processor" if perturbation.mode in ("pag", "seg") else "hook"
    done = []
    try:
        for _, m in mods:
            _acquire(m, kind)
            done.append(m)
        token = _ACTIVE.set({**(_ACTIVE.get() or {}), **{id(m): scope for _, m in mods}})
        try:
            yield
        finally:
            _ACTIVE.reset(token)
    finally:
        for m in done:
            _release(m, kind)
