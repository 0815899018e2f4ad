"""Row-marking hooks: perturb the attention (PAG, SEG, SLG, NAG) or the time embedding (TSG) of the marked rows only.

One network call can then hold the main and the perturbed branch of a guider (rows marked by the ``perturb``
conditioning key of :class:`~guidelab.integrations.diffusers.DiffusersDenoiser`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, cast

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
#: embedder; NAG every cross-attention (the official NAG pipelines: every ``attn2`` of the UNet; PixArt: every
#: block's ``attn2``; SD3 / FLUX: every joint attention, the official SD3 / FLUX NAG pipelines'). FLUX
#: (FluxTransformer2DModel, "flux"): diffusers has no FLUX PAG pipeline and recommends no FLUX layers; chosen by analogy
#: with SD3: PAG the double-stream block 1, SEG / SLG the double-stream blocks 7, 8, 9 (``^``: the name starts there,
#: so ``single_transformer_blocks.*`` are not selected). ``"all"``: every candidate layer.
DEFAULT_LAYERS: dict[str, dict[str, tuple[str, ...]]] = {
    "pag": {"unet": ("mid",), "transformer": ("blocks.1",), "flux": ("^transformer_blocks.1",)},
    "seg": {
        "unet": ("mid",),
        "transformer": ("transformer_blocks.7", "transformer_blocks.8", "transformer_blocks.9"),
        "flux": ("^transformer_blocks.7", "^transformer_blocks.8", "^transformer_blocks.9"),
    },
    "slg": {
        "unet": ("mid",),
        "transformer": ("transformer_blocks.7", "transformer_blocks.8", "transformer_blocks.9"),
        "flux": ("^transformer_blocks.7", "^transformer_blocks.8", "^transformer_blocks.9"),
    },
    "tsg": {"unet": ("all",), "transformer": ("all",)},
    "nag": {"unet": ("all",), "transformer": ("all",), "flux": ("all",)},
    "sag": {"unet": ("mid",), "transformer": ("mid",)},
}
MODES = ("pag", "seg", "slg", "tsg", "nag", "sag")
#: NAG's defaults (tau, alpha): the official SDXL pipeline's (nag_tau 2.5, nag_alpha 0.5).
NAG_DEFAULTS = (2.5, 0.5)
#: Models whose NAG negative prompt travels as extra rows of the batch (the text stream), not as a context key.
JOINT_NAG = ("SD3Transformer2DModel", "FluxTransformer2DModel")


def _selects(layer: str, name: str) -> bool:
    """``layer`` occurs in the module name ``name``; one ending in a digit not before another digit ("blocks.1"
    selects blocks.1 and blocks.1.attn1, not blocks.10); a leading ``^``: at the start of the name only
    ("^transformer_blocks.1" does not select single_transformer_blocks.1)."""
    anchor, layer = ("^", layer[1:]) if layer.startswith("^") and len(layer) > 1 else ("", layer)
    return re.search(anchor + re.escape(layer) + (r"(?!\d)" if layer[-1:].isdigit() else ""), name) is not None


def _nag_candidate(kind: str, m: torch.nn.Module, attention: type) -> bool:
    """A layer NAG may act on in a model of class ``kind``: FLUX every ``FluxAttention``, SD3 its joint attentions
    (with ``add_q_proj``), others their cross-attentions."""
    if kind == "FluxTransformer2DModel":
        return type(m).__name__ == "FluxAttention"
    if not isinstance(m, attention):
        return False
    return getattr(m, "add_q_proj", None) is not None if kind == "SD3Transformer2DModel" else bool(m.is_cross_attention)


class Perturbation:
    """What to do to the selected layers of the marked rows.

    * ``"pag"`` (Ahn et al. 2024): self-attention map replaced by the identity, i.e. softmax(QK^T) V -> V;
    * ``"seg"`` (Hong 2024): queries blurred by a Gaussian of std ``blur_sigma`` over the 2-D token grid
      (``inf``: every query replaced by their mean, i.e. uniform attention);
    * ``"slg"`` (skip-layer guidance, SD3.5): the selected blocks are skipped (output = input; SD3's
      ``JointTransformerBlock``: both the image and the text stream);
    * ``"nag"`` (normalized attention guidance, Chen et al. 2025): in the selected cross-attentions the attention
      output ``Z+`` (prompt) is extrapolated from ``Z-`` (the negative prompt, conditioning key ``nag_negative``):
      ``Z = s Z+ - (s - 1) Z-``, its L1 norm (over the features of each token) clipped to ``tau`` times ``Z+``'s,
      then blended ``alpha Z + (1 - alpha) Z+`` (``nag = (s, tau, alpha)``);
    * ``"sag"`` (self-attention guidance, Hong et al. 2023): nothing is changed; the selected self-attention's map,
      averaged over heads and summed over queries (the attention each token receives, [B, L]), is recorded;
    * ``"tsg"`` (time-step guidance, Sadat et al. 2025): the offset ``noise_embed_offset`` ([B, dim]) is added to
      the output of the time embedding MLP (UNets: ``time_embedding``, ``emb = time_embedding(time_proj(t))``;
      DiT / PixArt: every ``timestep_embedder``), before class / size embeddings are added to it.

    Candidates: self-attentions (PAG/SEG; SD3's joint attention included: PAG and SEG act on its image tokens as
    diffusers' ``PAGJointAttnProcessor2_0`` and its SEG hook do), transformer blocks or, in UNet2DModel, residual
    attention blocks (SLG), time embedders (TSG), cross-attentions (NAG). ``layers``: substrings of their module
    names (see :func:`_selects`), ``"all"``, or ``None``: :data:`DEFAULT_LAYERS`.
    """

    def __init__(
        self,
        mode: str,
        layers: str | Sequence[str] | None = None,
        blur_sigma: float = math.inf,
        nag: tuple[float, float, float] | None = None,
    ):
        check(mode in MODES, f"perturbation mode must be one of {', '.join(MODES)}, got {mode!r}")
        check(blur_sigma > 0, f"blur_sigma must be > 0, got {blur_sigma}")
        check(
            (mode == "nag") == (nag is not None) and (nag is None or (len(nag) == 3 and nag[1] > 0 and 0 <= nag[2] <= 1)),
            f"nag takes nag=(scale, tau > 0, 0 <= alpha <= 1) and only mode 'nag' does; got mode {mode!r}, nag={nag!r}",
        )
        self.nag = None if nag is None else (float(nag[0]), float(nag[1]), float(nag[2]))
        layers = [layers] if isinstance(layers, str) else layers
        check(
            layers is None or (len(layers) > 0 and all(isinstance(s, str) and s for s in layers)),
            f"layers must be module-name substrings, 'all' or None (the defaults), got {layers!r}",
        )
        self.mode, self.layers, self.blur_sigma = mode, None if layers is None else list(layers), blur_sigma
        self._found: tuple[torch.nn.Module | None, list[tuple[str, torch.nn.Module]]] = (None, [])  # searched once

    def modules(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        if self._found[0] is not model:
            self._found = (model, self._search(model))
        return self._found[1]

    def selection(self, model: torch.nn.Module) -> list[str]:
        """The ``layers`` in effect for ``model``: as given, or its family's :data:`DEFAULT_LAYERS`."""
        name = type(model).__name__
        family = "unet" if name.startswith("UNet") else "flux" if name == "FluxTransformer2DModel" else "transformer"
        defaults = DEFAULT_LAYERS[self.mode]
        return list(defaults.get(family, defaults["transformer"])) if self.layers is None else self.layers

    def _search(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        from diffusers.models.attention_processor import Attention

        if self.mode == "tsg":  # not class_embedding (also a TimestepEmbedding)
            blocks = [(n, m) for n, m in model.named_modules() if n == "time_embedding" or n.endswith("timestep_embedder")]
        elif self.mode == "slg":
            blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("TransformerBlock")]
            if not blocks:  # UNet2DModel: attention with its own residual
                blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and m.residual_connection]
        elif self.mode == "nag":  # cross-attentions; SD3: its joint attentions; FLUX: every attention (double, single)
            kind = type(model).__name__
            blocks = [(n, m) for n, m in model.named_modules() if _nag_candidate(kind, m, Attention)]
        else:  # self-attentions; FLUX's FluxAttention (joint in the double-stream blocks, [text; image] in the single)
            blocks = [
                (n, m)
                for n, m in model.named_modules()
                if (isinstance(m, Attention) and not m.is_cross_attention) or type(m).__name__ == "FluxAttention"
            ]
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
    """One perturbed call: the mode, the marks [B] as runs of equal marks, TSG's offset [B, dim], NAG's negative
    context [B, L, dim] (PixArt: already caption-projected), its text mask [B, L] (1 keep, 0 discard) and
    (scale, tau, alpha); ``nag`` None in a "nag" scope: a FLUX double-stream layer outside the selection (its image
    output is the prompt half's on both halves, so the image stream stays one stream)."""

    mode: str
    blur_sigma: float
    mask: torch.Tensor
    runs: tuple[tuple[int, int, bool], ...]
    offset: torch.Tensor | None
    negative: torch.Tensor | None = None
    nag: tuple[float, float, float] | None = None
    negative_mask: torch.Tensor | None = None
    store: list[tuple[int, torch.Tensor]] | None = None  # sag: where the recorded maps go
    pairs: int | None = None  # joint NAG: rows [prompt; negative] are [0, pairs) and [pairs, 2 pairs), then plain rows
    tokens: dict[str, int] = field(default_factory=dict)  # FLUX: {"text": the text length of the call} (set by _text_hook)


#: id(module) -> the scope perturbing it, in the current thread / task.
_ACTIVE: ContextVar[dict[int, _Scope] | None] = ContextVar("guidelab_perturbation", default=None)
_LOCK = threading.Lock()
_INSTALLED: dict[tuple[int, str], list[Any]] = {}  # (id(module), kind) -> [users, undo]


def _runs(mask: torch.Tensor) -> tuple[tuple[int, int, bool], ...]:
    """Runs of equal marks, e.g. [F, F, T, T] -> (0, 2, False), (2, 4, True)."""
    marks = mask.cpu().tolist()
    starts = [i for i in range(len(marks)) if i == 0 or marks[i] != marks[i - 1]]
    return tuple((i, j, marks[i]) for i, j in zip(starts, starts[1:] + [len(marks)], strict=True))


def _identity_mask(n_img: int, L: int, like: torch.Tensor) -> torch.Tensor:
    """PAG on joint attention (diffusers' ``PAGJointAttnProcessor2_0``): image tokens attend to themselves among the
    image tokens (the image-image block of the map is the identity) and to every text token; text tokens to all."""
    mask = torch.zeros(L, L, device=like.device, dtype=like.dtype)
    mask[:n_img, :n_img] = float("-inf")
    mask[:n_img, :n_img].fill_diagonal_(0)
    return mask[None, None]


def _nag(
    zp: torch.Tensor, zn: torch.Tensor, s: float, tau: float, alpha: float, eps: float = 0.0, order: int = 1
) -> torch.Tensor:
    """NAG on attention outputs [B, heads, L, d] (the official processors' order of operations, on [B, L, heads d]:
    ``Z = s Z+ - (s - 1) Z-``, ``r = |Z| / |Z+|`` per token, ``Z min(r, tau) / r``, ``alpha Z + (1 - alpha) Z+``;
    ``eps``: 0 as its UNet and FLUX processors, 1e-7 as its SD3 joint one; ``order``: the norm, 1 (L1, the paper's,
    its UNet and SD3 processors) or 2 (its ``NAGFluxAttnProcessor2_0``))."""
    B, Hh, L, d = zp.shape
    p, n = (z.transpose(1, 2).reshape(B, L, Hh * d) for z in (zp, zn))
    g = p * s - n * (s - 1)
    norm_p = torch.norm(p, p=order, dim=-1, keepdim=True).expand(*p.shape)
    norm_g = torch.norm(g, p=order, dim=-1, keepdim=True).expand(*g.shape)
    scale = norm_g / (norm_p + eps) if eps else norm_g / norm_p
    g = g * torch.minimum(scale, scale.new_ones(1) * tau) / (scale + eps if eps else scale)
    g = g * alpha + p * (1 - alpha)
    return g.reshape(B, L, Hh, d).transpose(1, 2)


def _received(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *_: Any,
    scale: float | None = None,
    **__: Any,
) -> torch.Tensor:
    """SAG: the attention map softmax(q k^T / sqrt(d) + mask) [B, heads, L, L] averaged over heads and summed over
    the queries, i.e. how much attention each token receives, [B, L] (what SAG thresholds at 1)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    if attn_mask is not None:
        logits = logits + attn_mask if attn_mask.dtype != torch.bool else logits.masked_fill(~attn_mask, -math.inf)
    return logits.softmax(-1).mean(1).sum(1)


def _pairs(scope: _Scope, B: int) -> int:
    """Joint NAG's number h of [prompt; negative] row pairs (i <-> h + i) in a batch of B rows; rows from 2h on
    are plain (CFG's unconditional rows); the marks must say so (the negative rows marked, no other)."""
    h = B // 2 if scope.pairs is None else scope.pairs
    m = scope.mask
    check(
        0 < 2 * h <= B and not bool(m[:h].any()) and bool(m[h : 2 * h].all()) and not bool(m[2 * h :].any()),
        "nag on joint attention needs the rows [prompt; negative prompt; plain rows] (the negative rows marked)",
    )
    return h


def _joint_nag(scope: _Scope, z: torch.Tensor, img: tuple[int, int], flux: bool) -> torch.Tensor:
    """NAG on joint attention outputs ``z`` [B, heads, L, d], rows [prompt; negative] paired i <-> h + i (then plain
    rows, untouched): the image tokens ``[img[0], img[1])`` of both get NAG of the pair's image outputs (SD3: L1
    norm, eps 1e-7; FLUX: L2, no eps, as the official processors), so the two image streams stay equal; the text
    tokens keep their own outputs (each text stream attends as usual)."""
    a0, b0 = img
    h = _pairs(scope, z.shape[0])
    zp = z[:h, :, a0:b0]
    if scope.nag is None:  # FLUX double-stream layer outside the selection: the prompt's image output
        g = zp
    else:
        s_, tau, alpha = scope.nag
        g = _nag(zp, z[h : 2 * h, :, a0:b0], s_, tau, alpha, eps=0.0 if flux else 1e-7, order=2 if flux else 1)
    return torch.cat([z[:, :, :a0], torch.cat([g, g, z[2 * h :, :, a0:b0]]), z[:, :, b0:]], dim=2)


def _sdpa(
    scope: _Scope,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *args: Any,
    img: tuple[int, int] | None = None,
    flux: bool = False,
    negative: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the marked rows perturbed; each row's attention computed once, on
    views of the batch (the original one on unmarked rows; PAG's marked rows need none: their output is V).
    ``img``: joint attention, the image tokens are ``[img[0], img[1])`` (SD3: first, FLUX: after the text);
    ``flux``: FLUX's attention (PAG sets the image tokens' output to their V instead of SD3's identity mask; NAG
    its L2 rule); ``negative``: NAG's attention output of the negative context, combined with this one on the
    marked rows."""
    n_img = None if img is None else img[1]
    B = scope.mask.shape[0]
    check(query.shape[0] == B, f"{scope.mode}: attention batch {query.shape[0]} != mask {B}")
    if scope.mode == "nag" and img is not None:  # joint attention: rows [prompt; negative]
        return _joint_nag(scope, F.scaled_dot_product_attention(query, key, value, *args, **kwargs), img, flux)

    def rows(v: Any, i: int, j: int) -> Any:  # a batch-sized tensor argument, sliced
        return v[i:j] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == B else v

    out = []
    for i, j, perturbed in scope.runs:
        q, k, v = query[i:j], key[i:j], value[i:j]
        a, kw = [rows(x, i, j) for x in args], {n: rows(x, i, j) for n, x in kwargs.items()}
        L = q.shape[-2]
        joint = img is not None and (img[0] > 0 or img[1] < L)
        if not perturbed or scope.mode == "sag":
            out.append(F.scaled_dot_product_attention(q, k, v, *a, **kw))
            if perturbed:
                assert scope.store is not None
                scope.store.append((i, _received(q, k, *a, **kw)))
        elif scope.mode == "nag":
            assert negative is not None and scope.nag is not None  # set by _Processor for nag scopes
            z = F.scaled_dot_product_attention(q, k, v, *a, **kw)
            out.append(_nag(z, negative[i:j].to(z), *scope.nag))
        elif scope.mode == "pag" and joint and flux:  # FLUX: the image tokens' output is their V, text attends
            assert img is not None
            check(
                not a and kw.get("attn_mask") is None,
                "pag on joint attention: the layer already passes an attention mask; this is not supported",
            )
            a0, b0 = img
            parts = [F.scaled_dot_product_attention(q[:, :, :a0], k, v, **kw)] if a0 > 0 else []
            parts.append(v[:, :, a0:b0])
            if b0 < L:
                parts.append(F.scaled_dot_product_attention(q[:, :, b0:], k, v, **kw))
            out.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
        elif scope.mode == "pag" and joint:
            check(
                not a and kw.get("attn_mask") is None,
                "pag on joint attention: the layer already passes an attention mask; this is not supported",
            )
            assert n_img is not None
            kw = {**kw, "attn_mask": _identity_mask(n_img, L, q)}
            out.append(F.scaled_dot_product_attention(q, k, v, **kw))
        elif scope.mode == "pag":  # identity attention map: output = V
            check(v.shape[-2] == L, "pag needs self-attention (as many keys as queries)")
            out.append(v)
        elif joint:  # seg on joint attention: only the image queries are blurred (diffusers' SEG hook on to_q)
            assert img is not None
            a0, b0 = img
            qb = torch.cat([q[:, :, :a0], _blur_queries(q[:, :, a0:b0], scope.blur_sigma), q[:, :, b0:]], dim=2)
            out.append(F.scaled_dot_product_attention(qb, k, v, *a, **kw))
        else:  # seg: attention of blurred queries
            out.append(F.scaled_dot_product_attention(_blur_queries(q, scope.blur_sigma), k, v, *a, **kw))
    return out[0] if len(out) == 1 else torch.cat(out)


class _PerturbedSDPA(TorchFunctionMode):
    """Inside one selected attention layer, in this thread only: ``F.scaled_dot_product_attention`` -> :func:`_sdpa`."""

    def __init__(
        self,
        scope: _Scope,
        img: tuple[int, int] | None = None,
        negative: torch.Tensor | None = None,
        record: bool = False,
        flux: bool = False,
    ):
        super().__init__()
        self.scope, self.calls, self.img, self.negative, self.flux = scope, 0, img, negative, flux
        # record: plain attention, its output kept (NAG's negative pass)
        self.record, self.recorded = record, cast("torch.Tensor | None", None)

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        if self.record:
            check(self.calls == 1, "nag: the attention processor calls attention more than once per layer")
            self.recorded = func(*args, **kwargs)
            return self.recorded
        return _sdpa(self.scope, *args, img=self.img, flux=self.flux, negative=self.negative, **kwargs)


def _mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The text mask [B, L] (1 keep, 0 discard) as diffusers' UNet2DConditionModel and PixArt pass it to
    ``attn2``: the additive bias ``(1 - mask) * -10000`` [B, 1, L]."""
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


class _Processor:
    """Wraps an attention processor; perturbs its attention where the calling context has a scope for the layer."""

    def __init__(self, inner: Any):
        self.inner = inner
        # Attention.forward passes on only the keywords named by inspect.signature(processor.__call__): the inner's
        call = functools.partial(type(self).__call__, self)
        call.__signature__ = inspect.signature(inner.__call__)  # type: ignore[attr-defined]  # read by inspect
        self.__call__ = call  # type: ignore[method-assign]  # the instance's call carries the inner's signature

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        scope = (_ACTIVE.get() or {}).get(id(attn))
        if scope is None:
            return self.inner(attn, hidden_states, *args, **kwargs)
        context = args[0] if args else kwargs.get("encoder_hidden_states")
        joint = context is not None and getattr(attn, "add_q_proj", None) is not None
        img, flux = None, type(attn).__name__ == "FluxAttention"
        if scope.mode == "nag" and not joint and not flux:
            return self._nag(scope, attn, hidden_states, context, args, kwargs)
        if flux:  # FLUX: [text; image]; double-stream: the text is the context, single-stream: in hidden_states
            n_txt = context.shape[1] if context is not None else scope.tokens.get("text")
            check(n_txt is not None, f"{scope.mode}: FLUX single-stream attention outside a FluxTransformer2DModel call")
            assert n_txt is not None  # checked above
            img = (n_txt, n_txt + hidden_states.shape[1] if context is not None else hidden_states.shape[1])
        elif joint:  # SD3 joint attention: image first
            img = (0, hidden_states.shape[1] if hidden_states.ndim == 3 else math.prod(hidden_states.shape[2:]))
        mode = _PerturbedSDPA(scope, img, flux=flux)
        with mode:
            out = self.inner(attn, hidden_states, *args, **kwargs)
        check(
            mode.calls > 0,
            f"{scope.mode}: attention processor {type(self.inner).__name__} does not call "
            "F.scaled_dot_product_attention, so it cannot be perturbed; use AttnProcessor2_0 (diffusers' default)",
        )
        return out

    def _nag(
        self,
        scope: _Scope,
        attn: Any,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None,
        args: tuple,
        kwargs: dict[str, Any],
    ) -> Any:
        """NAG on a cross-attention (the official ``NAGAttnProcessor2_0``'s rule): the layer run once with the
        negative context and its text mask (its attention output recorded), then with the prompt, its attention
        output combined with the recorded one on the marked rows. Without a negative mask the negative pass keeps
        the call's mask (as CFG's null branch does)."""
        check(
            context is not None and getattr(attn, "add_q_proj", None) is None,
            "nag acts on cross-attention layers (a UNet's or PixArt's attn2) or on SD3 / FLUX joint attention; "
            f"{type(attn).__name__} here is neither",
        )
        assert context is not None  # checked above
        neg = scope.negative
        assert neg is not None  # perturbed_attention checks it
        check(
            tuple(neg.shape) == tuple(context.shape),
            f"nag: the negative context {list(neg.shape)} must have the prompt's shape {list(context.shape)}",
        )
        neg = neg.to(context)
        positional = len(args) > 1
        mask = args[1] if positional else kwargs.get("attention_mask")
        if scope.negative_mask is not None:
            mask = _mask_bias(scope.negative_mask.to(context.device), mask.dtype if mask is not None else context.dtype)
        if positional:
            neg_args, neg_kwargs = (neg, mask, *args[2:]), kwargs
        elif args:
            neg_args, neg_kwargs = (neg,), {**kwargs, "attention_mask": mask}
        else:
            neg_args, neg_kwargs = (), {**kwargs, "encoder_hidden_states": neg, "attention_mask": mask}
        first = _PerturbedSDPA(scope, record=True)
        with first:
            self.inner(attn, hidden_states, *neg_args, **neg_kwargs)
        check(
            first.recorded is not None,
            f"nag: attention processor {type(self.inner).__name__} does not call F.scaled_dot_product_attention; "
            "use AttnProcessor2_0 (diffusers' default)",
        )
        with _PerturbedSDPA(scope, negative=first.recorded):
            return self.inner(attn, hidden_states, *args, **kwargs)


#: Blocks taking (hidden_states, encoder_hidden_states) and returning (encoder_hidden_states, hidden_states).
_TWO_STREAM = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def _text_hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of a FluxTransformer2DModel: its text length, for the single-stream attentions' scope."""
    scope = (_ACTIVE.get() or {}).get(id(module))
    if scope is not None:
        ctx = kwargs.get("encoder_hidden_states")
        check(ctx is not None, "FLUX attention guidance needs the transformer called with encoder_hidden_states=")
        assert ctx is not None  # checked above
        scope.tokens["text"] = ctx.shape[1]


def _emb_hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook of a FLUX double-stream block's image-stream ``norm1`` under NAG (rows [prompt; negative]):
    both halves are modulated by the prompt half's ``emb``, as the official pipeline's single (prompt) image stream
    of B rows is (the negative half's text stream keeps its own, the negative pooled projection's)."""
    scope = (_ACTIVE.get() or {}).get(id(module))
    if scope is None:
        return None
    emb = kwargs.get("emb")
    check(emb is not None, "nag on FLUX: the double-stream block's norm1 must be called with emb= (diffusers' blocks)")
    assert emb is not None  # checked above
    h = _pairs(scope, emb.shape[0])
    return args, {**kwargs, "emb": torch.cat([emb[:h], emb[:h], emb[2 * h :]])}


def _joint_skip(mask: torch.Tensor, args: tuple, kwargs: dict[str, Any], output: tuple) -> tuple:
    """SLG on SD3's JointTransformerBlock (returns ``(encoder_hidden_states, hidden_states)``): both streams skip
    the block on the marked rows, as the transformer's ``skip_layers`` does (the last block's text output is None)."""
    hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    ctx = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    ctx_out, hs_out = output
    hs_out = torch.where(bcast(mask.to(hs_out.device), hs_out), hs, hs_out)
    if ctx_out is not None:
        ctx_out = torch.where(bcast(mask.to(ctx_out.device), ctx_out), ctx, ctx_out)
    return ctx_out, hs_out


def _hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook: SLG (output = input) or TSG (output + offset) on the marked rows of the module's scope."""
    scope = (_ACTIVE.get() or {}).get(id(module))
    if scope is None:
        return None
    if scope.mode == "tsg":
        assert scope.offset is not None  # perturbed_attention checks it
        return torch.where(scope.mask.to(output.device)[:, None], output + scope.offset.to(output), output)
    if type(module).__name__ in _TWO_STREAM:
        return _joint_skip(scope.mask, args, kwargs, output)
    inp = args[0] if args else kwargs["hidden_states"]
    out = output[0] if isinstance(output, tuple) else output
    check(inp.shape == out.shape, f"slg: layer output {list(out.shape)} differs from its input {list(inp.shape)}")
    out = torch.where(bcast(scope.mask.to(out.device), out), inp, out)
    return (out, *output[1:]) if isinstance(output, tuple) else out


def _attach(module: torch.nn.Module, kind: str) -> Callable[[], None]:
    """Install the wrapper (``kind`` "processor") or the hook ("hook": SLG / TSG, "text": FLUX's text length, "emb":
    FLUX NAG's image-stream modulation); returns the function that removes it."""
    if kind == "hook":
        return module.register_forward_hook(_hook, with_kwargs=True).remove
    if kind in ("text", "emb"):
        return module.register_forward_pre_hook(_text_hook if kind == "text" else _emb_hook, with_kwargs=True).remove
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


def _flux_nag_extras(model: torch.nn.Module, scope: _Scope, selected: set[int]) -> list[tuple[torch.nn.Module, str, _Scope]]:
    """NAG on FLUX, beyond the selected attentions: every double-stream block's ``norm1`` (one image stream, see
    :func:`_emb_hook`) and its attention when not selected (the image output is the prompt half's: ``nag=None``)."""
    sync = dataclasses.replace(scope, nag=None, tokens={})
    out: list[tuple[torch.nn.Module, str, _Scope]] = []
    for block in model.transformer_blocks:  # type: ignore[union-attr]  # a FluxTransformer2DModel's ModuleList
        out.append((block.norm1, "emb", scope))
        if id(block.attn) not in selected:
            out.append((block.attn, "processor", sync))
    return out


def _project_negative(model: torch.nn.Module, negative: torch.Tensor) -> torch.Tensor:
    """PixArt: the raw negative caption embedding [B, L, caption_channels] through the model's
    ``caption_projection``, as the prompt is before its cross-attentions (other models: as given)."""
    proj = getattr(model, "caption_projection", None)
    if proj is None:
        return negative
    dtype = next(model.parameters()).dtype
    return proj(negative.to(dtype))


@contextlib.contextmanager
def perturbed_attention(
    model: torch.nn.Module,
    perturbation: Perturbation,
    mask: torch.Tensor,
    offset: torch.Tensor | None = None,
    negative: torch.Tensor | None = None,
    store: list[tuple[int, torch.Tensor]] | None = None,
    negative_mask: torch.Tensor | None = None,
    pairs: int | None = None,
) -> Iterator[None]:
    """Perturb the rows ``mask`` ([B] bool) of every forward call of ``model`` made inside the context, in this
    thread (or asyncio task) only.

    PAG/SEG: the selected attention layers' processors are wrapped; while one runs, a thread-local
    ``TorchFunctionMode`` routes its ``F.scaled_dot_product_attention`` (what diffusers' ``AttnProcessor2_0``
    calls) to a version that perturbs only the marked rows (a processor that never calls it is an error).
    SLG: the selected blocks' output is replaced by their input on those rows. TSG: ``offset`` ([B, dim]) is added
    to the time embedding's output on those rows. NAG: each selected cross-attention runs once more with the
    ``negative`` context ([B, L, dim], as the model takes ``encoder_hidden_states``: PixArt's is caption-projected
    here) and its ``negative_mask`` ([B, L]) and combines the two attention outputs on those rows; SD3 / FLUX: no
    ``negative``, the rows are [prompt; negative] (the second half marked; with ``pairs`` = h: rows [0, h) and
    [h, 2h), then plain unmarked rows) and the joint attentions combine each pair's image outputs. SAG: the
    selected layer's received attention ([rows, L]) of those rows is appended to ``store`` as ``(first row, map)``.
    The other rows are untouched, so one batched call can hold the main and the perturbed branch. Other threads and
    other models running at the same time are unaffected.
    """
    mods = perturbation.modules(model)
    name = type(model).__name__
    if perturbation.mode == "tsg":
        check(
            offset is not None and offset.ndim == 2 and offset.shape[0] == mask.shape[0],
            f"tsg needs {OFFSET} [B, dim] next to the perturb marks",
        )
    check(
        perturbation.mode != "nag" or (negative is not None and negative.shape[0] == mask.shape[0]) or name in JOINT_NAG,
        "nag needs the negative context nag_negative [B, L, dim] next to the perturb marks",
    )
    check(
        negative_mask is None or (negative is not None and tuple(negative_mask.shape) == tuple(negative.shape[:2])),
        "nag's negative mask must be [B, L], the negative context's batch and length",
    )
    check(perturbation.mode != "sag" or store is not None, "sag records attention maps: pass store=[]")
    if perturbation.mode == "nag" and negative is not None:
        negative = _project_negative(model, negative)
    mask = mask.bool()
    scope = _Scope(
        perturbation.mode,
        perturbation.blur_sigma,
        mask,
        _runs(mask),
        offset,
        negative,
        perturbation.nag,
        negative_mask,
        store,
        pairs=pairs,
    )
    kind = "processor" if perturbation.mode in ("pag", "seg", "nag", "sag") else "hook"
    marked = [(m, kind, scope) for _, m in mods]
    if kind == "processor" and name == "FluxTransformer2DModel":  # the single blocks' text length
        marked.append((model, "text", scope))
        if perturbation.mode == "nag":
            marked += _flux_nag_extras(model, scope, {id(m) for _, m in mods})
    done = []
    try:
        for m, k, _ in marked:
            _acquire(m, k)
            done.append((m, k))
        token = _ACTIVE.set({**(_ACTIVE.get() or {}), **{id(m): sc for m, _, sc in marked}})
        try:
            yield
        finally:
            _ACTIVE.reset(token)
    finally:
        for m, k in done:
            _release(m, k)
