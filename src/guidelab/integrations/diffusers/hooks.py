"""Row-marking hooks: perturb the attention (PAG, SEG, SLG) or the time embedding (TSG) of the marked rows only.

One network call can then hold the main and the perturbed branch of a guider (rows marked by the ``perturb``
conditioning key of :class:`~guidelab.integrations.diffusers.DiffusersDenoiser`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...denoisers import bcast
from ...errors import check
from ...guidance.tsg import KEY as OFFSET


class Perturbation:
    """What to do to the selected layers of the marked rows.

    * ``"pag"`` (Ahn et al. 2024): self-attention map replaced by the identity, i.e. softmax(QK^T) V -> V;
    * ``"seg"`` (Hong 2024): queries blurred by a Gaussian of std ``blur_sigma`` over the 2-D token grid
      (``inf``: every query replaced by their mean, i.e. uniform attention);
    * ``"slg"`` (skip-layer guidance, SD3.5): the selected blocks are skipped (output = input);
    * ``"tsg"`` (time-step guidance, Sadat et al. 2025): the offset ``noise_embed_offset`` ([B, dim]) is added to
      the output of the time embedding MLP (UNets: ``time_embedding``, ``emb = time_embedding(time_proj(t))``;
      DiT / PixArt: every ``timestep_embedder``), before class / size embeddings are added to it.

    ``layers``: substrings of module names to perturb; ``None``: every self-attention (PAG/SEG), every
    transformer block / residual attention block (SLG), every time embedder (TSG).
    """

    def __init__(self, mode: str, layers: Sequence[str] | None = None, blur_sigma: float = math.inf):
        check(mode in ("pag", "seg", "slg", "tsg"), f"perturbation mode must be 'pag', 'seg', 'slg' or 'tsg', got {mode!r}")
        check(blur_sigma > 0, f"blur_sigma must be > 0, got {blur_sigma}")
        self.mode, self.layers, self.blur_sigma = mode, None if layers is None else list(layers), blur_sigma
        self._found: tuple = (None, [])                             # (model, its modules): searched once

    def modules(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        if self._found[0] is not model:
            self._found = (model, self._search(model))
        return self._found[1]

    def _search(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        from diffusers.models.attention_processor import Attention
        if self.mode == "tsg":                                       # not class_embedding (also a TimestepEmbedding)
            blocks = [(n, m) for n, m in model.named_modules() if n == "time_embedding" or n.endswith("timestep_embedder")]
        elif self.mode == "slg":
            blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("TransformerBlock")]
            if not blocks:                                           # UNet2DModel: attention with its own residual
                blocks = [(n, m) for n, m in model.named_modules()
                          if isinstance(m, Attention) and m.residual_connection]
        else:
            blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]
        if self.layers is not None:
            blocks = [(n, m) for n, m in blocks if any(s in n for s in self.layers)]
        check(bool(blocks), f"{self.mode}: no layer of {type(model).__name__} matches layers={self.layers}")
        return blocks

    def embed_dim(self, model: torch.nn.Module) -> int:
        """TSG: size of the time embedding vector the offset is added to (the same for every selected embedder)."""
        dims = {m.linear_2.out_features for _, m in self.modules(model) if hasattr(m, "linear_2")}
        check(len(dims) == 1, f"tsg: the time embedders of {type(model).__name__} have sizes {sorted(dims)}; "
              "select embedders of one size with layers=...")
        return dims.pop()


def _blur_queries(q: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of queries [B, heads, L, d] over the sqrt(L) x sqrt(L) token grid (SEG)."""
    L = q.shape[-2]
    h = math.isqrt(L)
    check(h * h == L, f"seg needs a square token grid, got {L} tokens")
    r = math.ceil(3 * sigma) if math.isfinite(sigma) else h
    if r >= h:                          # wider than the grid: the mean query
        return q.mean(-2, keepdim=True).expand_as(q)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=q.dtype, device=q.device) / sigma) ** 2)
    k = k / k.sum()
    B, H, _, d = q.shape
    g = q.transpose(-1, -2).reshape(B * H * d, 1, h, h)
    g = F.conv2d(F.pad(g, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    g = F.conv2d(F.pad(g, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return g.reshape(B, H, d, L).transpose(-1, -2)


@contextlib.contextmanager
def perturbed_attention(model: torch.nn.Module, perturbation: Perturbation, mask: torch.Tensor,
                        offset: torch.Tensor | None = None):
    """Perturb the rows ``mask`` ([B] bool) of every forward call of ``model`` inside the context.

    Forward hooks on the selected modules. SLG replaces their output by their input on those rows; TSG adds
    ``offset`` ([B, dim]) to the time embedding's output on those rows (the other rows are untouched).
    PAG/SEG mark the module as active while it runs and route ``F.scaled_dot_product_attention`` (which
    diffusers' AttnProcessor2_0 calls) through a version that perturbs only the marked rows, so one
    batched call can hold the main and the perturbed branch; each row's attention is computed once (PAG's
    marked rows need none: their output is V). Not thread-safe (it patches torch's function for the
    duration of the context).
    """
    mods = perturbation.modules(model)
    handles, active = [], []
    if perturbation.mode == "tsg":
        check(offset is not None and offset.ndim == 2 and offset.shape[0] == mask.shape[0],
              f"tsg needs {OFFSET} [B, dim] next to the perturb marks")

        def shift(module, args, output):
            return torch.where(mask.to(output.device)[:, None], output + offset.to(output), output)
        handles = [m.register_forward_hook(shift) for _, m in mods]
    elif perturbation.mode == "slg":
        def skip(module, args, kwargs, output):
            inp = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            check(inp.shape == out.shape, f"slg: layer output {list(out.shape)} differs from its input {list(inp.shape)}")
            out = torch.where(bcast(mask.to(out.device), out), inp, out)
            return (out, *output[1:]) if isinstance(output, tuple) else out
        handles = [m.register_forward_hook(skip, with_kwargs=True) for _, m in mods]
    if perturbation.mode in ("tsg", "slg"):
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        return

    original = F.scaled_dot_product_attention

    # runs of equal marks, e.g. [F, F, T, T] -> (0, 2, False), (2, 4, True): each row's attention is computed
    # once, on views of the batch (the original one on unmarked rows, the perturbed one on marked rows)
    marks = mask.bool().cpu().tolist()
    B = len(marks)
    starts = [i for i in range(B) if i == 0 or marks[i] != marks[i - 1]]
    runs = [(i, j, marks[i]) for i, j in zip(starts, starts[1:] + [B])]

    def rows(v, i, j):                                               # a batch-sized tensor argument, sliced
        return v[i:j] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == B else v

    def sdpa(query, key, value, *args, **kwargs):
        if not active:
            return original(query, key, value, *args, **kwargs)
        check(query.shape[0] == B, f"{perturbation.mode}: attention batch {query.shape[0]} != mask {B}")
        out = []
        for i, j, perturbed in runs:
            q, k, v = query[i:j], key[i:j], value[i:j]
            a, kw = [rows(x, i, j) for x in args], {n: rows(x, i, j) for n, x in kwargs.items()}
            if not perturbed:
                out.append(original(q, k, v, *a, **kw))
            elif perturbation.mode == "pag":                         # identity attention map: output = V
                check(v.shape[-2] == q.shape[-2], "pag needs self-attention (as many keys as queries)")
                out.append(v)
            else:                                                    # seg: attention of blurred queries
                out.append(original(_blur_queries(q, perturbation.blur_sigma), k, v, *a, **kw))
        return out[0] if len(out) == 1 else torch.cat(out)

    def enter(module, args):
        active.append(module)

    def leave(module, args, output):
        active.pop()

    for _, m in mods:
        handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        for h in handles:
            h.remove()
