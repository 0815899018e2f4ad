"""diffusers models as guidelab denoisers, guiders through hooks (PAG, SEG, SLG, TSG), ICG and ``generate``.

A diffusers model is a discrete-time VP network ``F(x_VP, t, **cond)`` trained on timesteps t = 0..T-1 with
``alpha_bar_t`` from its scheduler config (``beta_schedule``, ``beta_start``, ``beta_end``, ``trained_betas``).
In EDM coordinates (``x = x0 + sigma n``) that is

* ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` and ``x_VP = x / sqrt(1 + sigma^2)``;
* ``prediction_type``: "epsilon" ``D = x - sigma F``; "v_prediction" ``D = x / (1 + s^2) - s / sqrt(1 + s^2) F``;
  "sample" ``D = F``.

Continuous sigma -> timestep (``timesteps=``): "interpolate" (default) puts ``log sigma`` linearly between
the two neighbouring grid timesteps and feeds the fractional t (the networks embed t with sinusoids, which
take any real t); "nearest" snaps to the grid timestep nearest in ``log sigma``. On grid sigmas both give
the integer t exactly, so sampling on ``den.sigmas(n, spacing)`` equals diffusers' schedulers. Sigmas
outside the grid are clamped to t = 0 or T - 1 (the sigma itself is still used in the conversion).

Text-conditioned transformers (PixArt: ``PixArtTransformer2DModel``, or a ``Transformer2DModel`` with
``norm_type="ada_norm_single"``) take ``encoder_hidden_states`` and ``encoder_attention_mask``; their
``added_cond_kwargs`` come from the conditioning keys ``resolution`` / ``aspect_ratio`` (``None`` unless the model
is micro-conditioned). CFG on text models (:func:`cfg`) swaps embedding and mask for the null / negative ones.

Models load from local folders only (``local_files_only=True``): nothing is downloaded.
See docs/DIFFUSERS.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import guidance, samplers, schedules
from .._io import atomic_write, to_uint8, write_png
from ..denoisers import bcast
from ..errors import GuidelabError, check
from ..guidance._base import Branch, Guided, PerCall
from ..guidance.compose import Composed, compose
from ..guidance.tsg import KEY as TSG_KEY
from ..rng import SampleNoise

MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel",
                 "PixArtTransformer2DModel")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
TIMESTEP_MODES = ("interpolate", "nearest")
#: Conditioning key that marks the rows of a batch whose attention (PAG/SEG/SLG) or time embedding (TSG) is perturbed.
PERTURB = "perturb"
#: Conditioning key of the text attention mask ([B, L], 1 = keep, 0 = discard), as diffusers names it.
MASK = "encoder_attention_mask"
#: PixArt micro-conditions, passed to the model as ``added_cond_kwargs``.
MICRO = ("resolution", "aspect_ratio")
#: Conditioning key of TSG's time-embedding offset ([B, dim]), added on the rows marked ``perturb``.
OFFSET = TSG_KEY


def alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """``alpha_bar_t`` for t = 0..T-1 exactly as diffusers computes it (float32 betas), returned in float64."""
    from diffusers import DDPMScheduler
    cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    try:
        sched = DDPMScheduler.from_config(cfg)
    except (NotImplementedError, ValueError) as e:
        raise GuidelabError(f"unsupported scheduler config: {e}") from None
    return sched.alphas_cumprod.double()


class DiffusersDenoiser:
    """A diffusers network + its noise schedule as ``D(x, sigma, **cond)`` in EDM space.

    ``x``: [B, C, H, W] in EDM scale; ``sigma``: [B]. Conditioning: ``class_labels`` ([B] long) or
    ``encoder_hidden_states`` ([B, L, dim]) with optionally ``encoder_attention_mask`` ([B, L]); PixArt
    micro-conditioned models also ``resolution`` ([B, 2], pixels) and ``aspect_ratio`` ([B, 1]); ``perturb``
    ([B] bool) perturbs those rows' attention (see :func:`perturbed_attention`; set by the PAG/SEG/SLG guiders) or,
    with ``noise_embed_offset`` ([B, dim]), adds the offset to those rows' time embedding (TSG, :func:`tsg`).
    ``null_label`` is the null condition CFG uses: the null class id, or the empty-prompt (or negative-prompt)
    embedding ``null_text`` ([1, L, dim], expanded to the batch) with its mask ``null_mask`` ([1, L]).
    """

    def __init__(self, model: torch.nn.Module, scheduler_config: dict, *, timesteps: str = "interpolate",
                 null_class: int | None = None, null_text: torch.Tensor | None = None,
                 null_mask: torch.Tensor | None = None, perturbation: Perturbation | None = None):
        check(timesteps in TIMESTEP_MODES, f"timesteps must be one of {TIMESTEP_MODES}, got {timesteps!r}")
        pred = dict(scheduler_config).get("prediction_type", "epsilon")
        check(pred in PREDICTIONS, f"prediction_type {pred!r} is not supported; allowed: {', '.join(PREDICTIONS)}")
        abar = alphas_cumprod(scheduler_config)
        check(bool((abar > 0).all()), "alpha_bar reaches 0 (zero terminal SNR): infinite sigma is not supported")
        self.model = model.eval()
        self.config = dict(scheduler_config)
        self.prediction_type, self.timestep_mode = pred, timesteps
        self.grid = ((1 - abar) / abar).sqrt()                      # sigma_t, t = 0..T-1, increasing
        self._log_grid = self.grid.log()
        self.cfg_key = "encoder_hidden_states" if _takes_text(model) else "class_labels"
        if null_class is None and type(model).__name__ in ("DiTTransformer2DModel", "Transformer2DModel"):
            n = getattr(model.config, "num_embeds_ada_norm", None)  # DiT's label table has num_classes + 1 rows:
            null_class = n if self.cfg_key == "class_labels" else None  # the last is the dropped label
        check(null_mask is None or null_text is not None, "null_mask needs null_text (the embedding it masks)")
        self.null_class, self.null_text, self.null_mask = null_class, null_text, null_mask
        # PixArt (adaLN-single): added_cond_kwargs always, micro-conditions only if the model was trained with them
        self.adaln_single = getattr(model.config, "norm_type", None) == "ada_norm_single"
        self.micro = self.adaln_single and bool(getattr(model, "use_additional_conditions", False))
        self.perturbation = perturbation

    # -- schedule ---------------------------------------------------------------------------
    @property
    def sigma_min(self) -> float:
        return float(self.grid[0])

    @property
    def sigma_max(self) -> float:
        return float(self.grid[-1])

    def sigmas(self, n: int, spacing: str = "leading", **kw) -> torch.Tensor:
        """``n`` grid sigmas picked like diffusers' ``timestep_spacing`` (schedules.discrete), then 0."""
        return schedules.discrete(n, self.grid, spacing, **kw)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous (or snapped) timestep of each sigma, float64 [B] (see the module docstring)."""
        dev = sigma.device if sigma.device.type in ("cpu", "cuda") else torch.device("cpu")   # float64 there
        ls = sigma.detach().to(dev, torch.float64).clamp_min(1e-30).log()
        if self._log_grid.device != dev:
            self._log_grid = self._log_grid.to(dev)
        lg = self._log_grid
        if self.timestep_mode == "nearest":
            return (ls[:, None] - lg[None, :]).abs().argmin(1).double()
        i = torch.searchsorted(lg, ls).clamp(1, lg.numel() - 1)     # lg[i-1] <= ls < lg[i]
        frac = (ls - lg[i - 1]) / (lg[i] - lg[i - 1])
        return ((i - 1).double() + frac).clamp(0, lg.numel() - 1)

    # -- conditioning -----------------------------------------------------------------------
    @property
    def null_label(self):
        """Null condition for ``guidance.cfg(den, w, key=den.cfg_key)``."""
        if self.cfg_key == "class_labels":
            return self.null_class
        if self.null_text is None:
            return None
        null = self.null_text

        def expand(old):
            check(old.shape[1:] == null.shape[1:], f"null/negative embedding {list(null.shape[1:])} and prompt "
                  f"embedding {list(old.shape[1:])} differ: pad both to the same length (and pass attention masks)")
            return null.to(old).expand(old.shape[0], *null.shape[1:])
        return expand

    def cfg_overrides(self) -> tuple[dict, dict]:
        """Branch overrides ``(conditional, null)`` for CFG in one batched call.

        Class models: the label becomes the null class. Text models: the embedding becomes ``null_text`` and the
        attention mask ``null_mask`` (all ones, i.e. unmasked, when not given); the conditional branch keeps its
        mask (all ones when only the null side has one), so both branches carry the same keys and batch.
        """
        check(self.null_label is not None, f"cfg needs a null condition: pass null_class=... (class models) or "
              f"null_text=... (text models); {type(self.model).__name__} has no default")
        if self.cfg_key == "class_labels":
            return {}, {"class_labels": self.null_class}
        null_mask = self.null_mask

        def cond_mask(old, x, sigma):
            if old is None and null_mask is not None:
                return torch.ones(x.shape[0], null_mask.shape[-1], dtype=null_mask.dtype, device=x.device)
            return old

        def uncond_mask(old, x, sigma):
            if null_mask is not None:
                return null_mask.to(x.device).expand(x.shape[0], -1)
            return None if old is None else torch.ones_like(old)

        return {MASK: PerCall(cond_mask)}, {"encoder_hidden_states": self.null_label, MASK: PerCall(uncond_mask)}

    @property
    def num_classes(self) -> int | None:
        """Number of real classes of a class-conditional model (ICG's random labels), else ``None``.

        DiT: ``num_embeds_ada_norm`` (its table's extra last row is the null label). UNets with a label table
        (``num_class_embeds``, ``class_embed_type=None``): its size, less the last row if that is ``null_class``.
        """
        if self.cfg_key != "class_labels":
            return None
        c = self.model.config
        if type(self.model).__name__ in ("DiTTransformer2DModel", "Transformer2DModel"):
            return getattr(c, "num_embeds_ada_norm", None)
        n = getattr(c, "num_class_embeds", None)
        if n is None or getattr(c, "class_embed_type", None) is not None:
            return None
        return n - 1 if self.null_class == n - 1 else n

    # -- the denoiser -----------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        cond = {k: v for k, v in cond.items() if v is not None}   # e.g. no attention mask on either CFG branch
        mask = cond.pop(PERTURB, None)
        offset = cond.pop(OFFSET, None)
        s = bcast(sigma.to(x.dtype), x)
        dtype = next(self.model.parameters()).dtype
        x_vp = (x / (1 + s ** 2).sqrt()).to(dtype)
        t = self.timestep(sigma).to(device=x.device, dtype=torch.float32)
        cond = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in cond.items()}
        if self.adaln_single:                                        # PixArt: micro-conditions or None
            added = {k: cond.pop(k, None) for k in MICRO}
            check(not self.micro or all(v is not None for v in added.values()),
                  "this PixArt model is micro-conditioned (use_additional_conditions): pass resolution [B, 2] "
                  "(height, width in pixels) and aspect_ratio [B, 1] in cond")
            cond["added_cond_kwargs"] = added
        ctx = contextlib.nullcontext()
        check(offset is None or mask is not None, f"{OFFSET} needs perturb= marks on the rows it perturbs (use gd.tsg)")
        if mask is not None and bool(mask.any()):
            check(self.perturbation is not None, "perturb= needs a denoiser made with perturbation=Perturbation(...)")
            ctx = perturbed_attention(self.model, self.perturbation, mask.bool(), offset=offset)
        with ctx:
            out = self.model(x_vp, timestep=t, **cond, return_dict=False)[0]   # Transformer2DModel: keyword only
        if out.shape[1] == 2 * x.shape[1]:                           # learned variance: keep the mean part
            out = out[:, : x.shape[1]]
        out = out.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x / (1 + s ** 2) - s / (1 + s ** 2).sqrt() * out
        return out

    def with_perturbation(self, perturbation: Perturbation) -> DiffusersDenoiser:
        """The same network and schedule, perturbing rows marked ``perturb`` with ``perturbation``."""
        import copy
        new = copy.copy(self)
        new.perturbation = perturbation
        return new


def _takes_text(model) -> bool:
    return type(model).__name__ in ("UNet2DConditionModel", "PixArtTransformer2DModel") or (
        type(model).__name__ == "Transformer2DModel" and getattr(model.config, "cross_attention_dim", None) is not None)


# ---------------------------------------------------------------------------------------------
# Loading from a local folder.

def _read_json(p: Path) -> dict:
    with open(p) as f:
        return json.load(f)


def _find(path: Path, subfolder: str | None) -> tuple[Path, dict]:
    """(model folder, scheduler config) of a pipeline folder (model_index.json, unet/ or transformer/,
    scheduler/) or of a model folder with config.json and scheduler_config.json."""
    check(path.is_dir(), f"diffusers model folder {str(path)!r} does not exist (models load from local folders only; "
          "nothing is downloaded from the hub)")
    if subfolder is None and (path / "model_index.json").exists():
        subfolder = next((s for s in ("unet", "transformer") if (path / s / "config.json").exists()), None)
        check(subfolder is not None, f"{path} has model_index.json but no unet/ or transformer/ with a config.json")
    model_dir = path / subfolder if subfolder else path
    check((model_dir / "config.json").exists(), f"{model_dir} has no config.json (expected a diffusers model folder)")
    for p in (path / "scheduler" / "scheduler_config.json", model_dir / "scheduler_config.json",
              path / "scheduler_config.json"):
        if p.exists():
            return model_dir, _read_json(p)
    raise GuidelabError(f"no scheduler_config.json in {path}/scheduler, {model_dir} or {path}: the noise schedule is needed")


def load_model(path: str | os.PathLike, *, subfolder: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """``(model, scheduler_config)`` from a local folder; ``from_pretrained(..., local_files_only=True)``."""
    import diffusers
    model_dir, sched = _find(Path(path), subfolder)
    name = _read_json(model_dir / "config.json").get("_class_name")
    check(name in MODEL_CLASSES, f"{model_dir}: model class {name!r} is not supported; allowed: {', '.join(MODEL_CLASSES)}")
    model = getattr(diffusers, name).from_pretrained(model_dir, local_files_only=True, torch_dtype=dtype,
                                                 low_cpu_mem_usage=False)
    return model.to(device).eval(), sched


def load(path: str | os.PathLike, *, subfolder: str | None = None, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu", timesteps: str = "interpolate", null_class: int | None = None,
         null_text: torch.Tensor | None = None, null_mask: torch.Tensor | None = None) -> DiffusersDenoiser:
    """A :class:`DiffusersDenoiser` from a local diffusers folder (a missing folder is one clear error)."""
    model, sched = load_model(path, subfolder=subfolder, dtype=dtype, device=device)
    return DiffusersDenoiser(model, sched, timesteps=timesteps, null_class=null_class, null_text=null_text,
                             null_mask=null_mask)


# ---------------------------------------------------------------------------------------------
# Attention perturbation through hooks (PAG, SEG, SLG).

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


def _mark(value: bool) -> PerCall:
    return PerCall(lambda old, x, sigma: torch.full((x.shape[0],), value, dtype=torch.bool, device=x.device))


MARKED, UNMARKED = _mark(True), _mark(False)


def cfg(denoiser: DiffusersDenoiser, w) -> Guided:
    """CFG with the model's null condition (null class, or null / negative embedding with its attention mask, see
    :meth:`DiffusersDenoiser.cfg_overrides`); both branches in one batched call. ``w`` = diffusers' guidance_scale."""
    c, u = denoiser.cfg_overrides()
    return Guided(Branch(denoiser, c), Branch(denoiser, u), w, "cfg")


def attention_guidance(denoiser: DiffusersDenoiser, w, mode: str, *, layers: Sequence[str] | None = None,
                       blur_sigma: float = math.inf, cfg_weight=None, batched: bool = True) -> Guided | Composed:
    """``D = D_pert + w (D - D_pert)``: guide a diffusers denoiser with its own attention-perturbed branch.

    ``cfg_weight``: CFG as well, as in the PAG paper and diffusers' PAG pipelines (a :func:`compose` of the two):
    ``D = D_u + cfg_weight (D_c - D_u) + (w - 1)(D_c - D_pert)``, i.e. diffusers' ``guidance_scale = cfg_weight``
    and ``pag_scale = w - 1``; ``D_pert`` is perturbed with the *conditional* prompt.
    ``batched=True``: all branches are rows of **one** network call (the hook perturbs only the marked rows);
    ``batched=False``: one call of B rows per branch (what diffusers' modular guiders do).
    """
    check(isinstance(denoiser, DiffusersDenoiser), f"{mode} needs a DiffusersDenoiser, got {type(denoiser).__name__}")
    den = denoiser.with_perturbation(Perturbation(mode, layers, blur_sigma))
    c, u = ({}, {}) if cfg_weight is None else den.cfg_overrides()
    # distinct objects are evaluated separately (evaluate groups branches by denoiser)
    other = (lambda: den) if batched else (lambda: den.with_perturbation(den.perturbation))
    main = Branch(den, {**c, PERTURB: UNMARKED})
    perturbed = Guided(main, Branch(other(), {**c, PERTURB: MARKED}), w, mode)
    if cfg_weight is None:
        return perturbed
    return compose(Guided(main, Branch(other(), {**u, PERTURB: UNMARKED}), cfg_weight, "cfg"), perturbed)


def pag(denoiser, w, *, layers=None, cfg_weight=None, batched: bool = True) -> Guided | Composed:
    """Perturbed-attention guidance (Ahn et al. 2024, arXiv 2403.17377); paper scale s = w - 1; with CFG at
    ``cfg_weight`` in the same call (see :func:`attention_guidance`)."""
    return attention_guidance(denoiser, w, "pag", layers=layers, cfg_weight=cfg_weight, batched=batched)


def seg(denoiser, w, *, layers=None, blur_sigma: float = math.inf, cfg_weight=None,
        batched: bool = True) -> Guided | Composed:
    """Smoothed-energy guidance (Hong 2024, arXiv 2408.00760): blurred queries; paper scale = w - 1."""
    return attention_guidance(denoiser, w, "seg", layers=layers, blur_sigma=blur_sigma, cfg_weight=cfg_weight,
                              batched=batched)


def slg(denoiser, w, *, layers=None, cfg_weight=None, batched: bool = True) -> Guided | Composed:
    """Skip-layer guidance (Stable Diffusion 3.5): the reference skips the selected blocks; scale = w - 1."""
    return attention_guidance(denoiser, w, "slg", layers=layers, cfg_weight=cfg_weight, batched=batched)


def icg(denoiser: DiffusersDenoiser, w, *, seeds=None, num_classes: int | None = None) -> Guided:
    """Independent condition guidance (guidance.icg) with the model's conditioning; one call of 2B rows.

    Class models (``class_labels``): the reference gets a uniform random label in ``[0, num_classes)`` (default
    :attr:`DiffusersDenoiser.num_classes`). Text models (``encoder_hidden_states``): a Gaussian embedding with
    each sample's mean and std of its prompt embedding (over all tokens); the attention mask is kept, so the
    reference attends to random tokens where the prompt has tokens. ``seeds``: per-sample, batch invariant draws.
    """
    check(isinstance(denoiser, DiffusersDenoiser), f"icg needs a DiffusersDenoiser, got {type(denoiser).__name__}")
    if denoiser.cfg_key == "class_labels":
        n = denoiser.num_classes if num_classes is None else num_classes
        check(n is not None, f"icg on this {type(denoiser.model).__name__} needs num_classes=... (it has no label table "
              "whose size gives the classes)")
        return guidance.icg(denoiser, w, key="class_labels", kind="label", num_classes=n, seeds=seeds)
    check(num_classes is None, "num_classes is for class-conditional models; text models get a Gaussian embedding")
    return guidance.icg(denoiser, w, key="encoder_hidden_states", kind="gaussian", seeds=seeds)


def tsg(denoiser: DiffusersDenoiser, w, *, s: float = 0.5, alpha: float = 1.0, seeds=None,
        layers: Sequence[str] | None = None) -> Guided:
    """Time-step guidance (guidance.tsg), faithful form: the reference rows' time embedding *vector* gets
    ``s t^alpha n`` (``t = 1 - alpha_bar = sigma^2 / (1 + sigma^2)``, ``n`` a random direction in R^dim) through
    a forward hook on the time embedder (:class:`Perturbation` "tsg"); their input scaling, timestep and output
    conversion are unchanged. Both branches are rows of one call, the reference rows marked ``perturb``."""
    check(isinstance(denoiser, DiffusersDenoiser), f"tsg needs a DiffusersDenoiser, got {type(denoiser).__name__}")
    den = denoiser.with_perturbation(Perturbation("tsg", layers))
    g = guidance.tsg(den, w, s=s, alpha=alpha, dim=den.perturbation.embed_dim(den.model), seeds=seeds)
    return Guided(Branch(den, {**g.main.overrides, PERTURB: UNMARKED}), Branch(den, {**g.ref.overrides, PERTURB: MARKED}),
                  w, "tsg")


# ---------------------------------------------------------------------------------------------
# Pipeline-style entry point.

GUIDERS = ("none", "cfg", "autoguidance", "pag", "seg", "slg", "icg", "tsg", "apg")
#: Keyword options of each guider (``options=`` / ``--option KEY=VALUE``).
OPTIONS = {"icg": ("num_classes",), "tsg": ("s", "alpha"), "apg": ("eta", "r", "beta")}
SCHEDULES = ("karras", "leading", "trailing", "linspace")


def make_guider(den: DiffusersDenoiser, guider: str, w: float, *, guide: DiffusersDenoiser | None = None,
                layers: Sequence[str] | None = None, blur_sigma: float = math.inf, interval=None, cfg_weight=None,
                seeds=None, options: dict | None = None):
    """The guided denoiser called ``guider`` (one of :data:`GUIDERS`) at weight w, optionally only inside
    ``interval = (sigma_lo, sigma_hi)``. ``cfg_weight`` (pag, seg, slg only): CFG at that weight in the same
    batched call, ``D = D_u + cfg_weight (D_c - D_u) + (w - 1)(D_c - D_pert)``. ``seeds``: per-sample seeds of
    the batch (icg, tsg draw from them). ``options`` (:data:`OPTIONS`): icg ``num_classes``; tsg ``s``,
    ``alpha``; apg (APG on CFG, a fresh momentum per guider) ``eta``, ``r``, ``beta``. ``layers``: pag, seg,
    slg, tsg."""
    check(guider in GUIDERS, f"unknown guider {guider!r}; allowed: {', '.join(GUIDERS)}")
    check(cfg_weight is None or guider in ("pag", "seg", "slg"),
          f"cfg_weight combines CFG with pag, seg or slg; for {guider!r} use guider='cfg' or leave it unset")
    check(layers is None or guider in ("pag", "seg", "slg", "tsg"), f"layers is for pag, seg, slg or tsg, not {guider!r}")
    options = dict(options or {})
    allowed = OPTIONS.get(guider, ())
    bad = sorted(set(options) - set(allowed))
    check(not bad, f"{guider} takes no option {', '.join(bad)}; allowed: {', '.join(allowed) or 'none'}")
    if guider == "none":
        return den
    if guider == "cfg":
        g = cfg(den, w)
    elif guider == "apg":
        g = guidance.apg(cfg(den, w), **options)
    elif guider == "icg":
        g = icg(den, w, seeds=seeds, **options)
    elif guider == "tsg":
        g = tsg(den, w, seeds=seeds, layers=layers, **options)
    elif guider == "autoguidance":
        check(guide is not None, "autoguidance needs a guide model (guide_dir=... / --guide DIR)")
        check(guide.grid.shape == den.grid.shape and torch.allclose(guide.grid, den.grid),
              "the guide model's noise schedule differs from the main model's")
        g = guidance.autoguidance(den, guide, w)
    else:
        g = attention_guidance(den, w, guider, layers=layers, blur_sigma=blur_sigma, cfg_weight=cfg_weight)
    if interval is not None:
        g = guidance.interval(g, *interval)
    return g


def make_sigmas(den: DiffusersDenoiser, steps: int, schedule: str = "karras") -> torch.Tensor:
    """``karras`` between the model's grid ends, or the grid timesteps picked by diffusers' spacing names."""
    check(schedule in SCHEDULES, f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if schedule == "karras":
        return schedules.karras(steps, den.sigma_min, den.sigma_max)
    return den.sigmas(steps, schedule)


def save_outputs(out: str | os.PathLike, x: torch.Tensor, seeds: Sequence[int], **extra) -> Path:
    """``out/samples.npz`` (x, seeds, extra arrays) and, for 1- or 3-channel samples, ``out/<seed>.png``
    (values in [-1, 1] mapped to 0..255); every file written atomically (temp file + os.replace)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arr = x.detach().float().cpu().numpy()
    if arr.shape[1] in (1, 3):
        for s, im in zip(seeds, to_uint8(arr)):
            write_png(out / f"{int(s):06d}.png", im)
    path = out / "samples.npz"
    atomic_write(path, lambda f: np.savez(f, x=arr, seeds=np.asarray(list(seeds), dtype=np.int64),
                                           **{k: np.asarray(v) for k, v in extra.items()}))
    return path


def generate(model_dir: str | os.PathLike, *, guider: str = "none", w: float = 1.0, sampler: str = "euler",
             steps: int = 32, schedule: str = "karras", seeds: Iterable[int] = (0,), batch: int = 16,
             class_labels: int | Sequence[int] | None = None, prompt_embeds: torch.Tensor | None = None,
             prompt_mask: torch.Tensor | None = None, null_class: int | None = None,
             null_text: torch.Tensor | None = None, null_mask: torch.Tensor | None = None, guide_dir=None,
             layers: Sequence[str] | None = None, blur_sigma: float = math.inf, interval=None, cfg_weight=None,
             options: dict | None = None, resolution: int | None = None, timesteps: str = "interpolate", dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", out: str | os.PathLike | None = None, progress: bool = False,
             **sampler_kw) -> torch.Tensor:
    """Sample a local diffusers model with any guidelab sampler and guider; returns x0 [N, C, H, W] (model space).

    Sample i starts from ``SampleNoise([seeds[i]])`` and draws its sampler noise from the same generator, so
    it does not depend on ``batch``. ``class_labels``: one id or one per seed; ``prompt_embeds``: [1 or N, L, dim]
    with optionally ``prompt_mask`` [1 or N, L]; ``null_text`` / ``null_mask``: null or negative prompt for CFG;
    ``cfg_weight``: CFG together with pag/seg/slg; ``guide_dir``: second model for autoguidance; ``options``:
    guider keywords (:func:`make_guider`; the guider is built per batch, so icg / tsg draw from each sample's
    seed and APG's momentum starts fresh); ``resolution``:
    the pixel size micro-conditioned PixArt models are told (default 8 x sample_size, PixArt's VAE factor).
    Latent models return latents (no VAE decoding).
    """
    seeds = [int(s) for s in seeds]
    check(len(seeds) >= 1, "need at least one seed")
    check(batch >= 1, f"batch must be >= 1, got {batch}")
    kw = {"dtype": dtype, "device": device, "timesteps": timesteps, "null_class": null_class, "null_text": null_text,
          "null_mask": null_mask}
    den = load(model_dir, **kw)
    guide = load(guide_dir, **kw) if guide_dir is not None else None
    def guided(batch_seeds):
        return make_guider(den, guider, w, guide=guide, layers=layers, blur_sigma=blur_sigma, interval=interval,
                           cfg_weight=cfg_weight, seeds=batch_seeds, options=options)
    guided(seeds[:batch])                                            # bad combinations fail before any sampling
    run = samplers.get(sampler)
    sigmas = make_sigmas(den, steps, schedule)
    mc = den.model.config
    channels = mc.in_channels
    size = mc.sample_size if isinstance(mc.sample_size, int) else mc.sample_size[0]
    N = len(seeds)
    cond_all: dict[str, torch.Tensor] = {}
    if class_labels is not None:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        check(labels.numel() in (1, N), f"class_labels: give one label or one per seed ({N}), got {labels.numel()}")
        cond_all["class_labels"] = labels.expand(N).to(device)
    if prompt_embeds is not None:
        check(prompt_embeds.ndim == 3 and prompt_embeds.shape[0] in (1, N),
              f"prompt_embeds must have shape [1 or {N}, L, dim], got {list(prompt_embeds.shape)}")
        cond_all["encoder_hidden_states"] = prompt_embeds.to(device=device, dtype=dtype).expand(N, -1, -1)
    if prompt_mask is not None:
        check(prompt_embeds is not None and prompt_mask.shape in ((1, prompt_embeds.shape[1]), (N, prompt_embeds.shape[1])),
              f"prompt_mask must have shape [1 or {N}, L] next to prompt_embeds, got {list(prompt_mask.shape)}")
        cond_all[MASK] = prompt_mask.to(device).expand(N, -1)
    if den.micro:                                                    # PixArt micro-conditions, as its pipeline
        px = 8 * size if resolution is None else int(resolution)
        cond_all["resolution"] = torch.tensor([[px, px]], dtype=torch.float64, device=device).expand(N, -1)
        cond_all["aspect_ratio"] = torch.ones(N, 1, dtype=torch.float64, device=device)
    check(den.cfg_key in cond_all or (guider not in ("cfg", "apg", "icg") and cfg_weight is None),
          f"{guider} on this model needs {den.cfg_key} (--class-label / prompt embeddings)")
    check(not (den.cfg_key == "encoder_hidden_states" and "encoder_hidden_states" not in cond_all),
          "a text-conditioned model needs prompt_embeds (encoder_hidden_states)")
    xdtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32   # half models: float32 sampler
    xs = []
    for i in range(0, N, batch):
        noise = SampleNoise(seeds[i:i + batch], device=device)
        x = noise.randn([channels, size, size], dtype=xdtype) * sigmas[0].to(xdtype)
        cond = {k: v[i:i + batch] for k, v in cond_all.items()}
        xs.append(run(guided(seeds[i:i + batch]), x, sigmas.to(xdtype), cond=cond, noise=noise, progress=progress,
                      **sampler_kw))
    x = torch.cat(xs)
    if out is not None:
        extra = {"class_labels": cond_all["class_labels"].cpu()} if "class_labels" in cond_all else {}
        save_outputs(out, x, seeds, **extra)
    return x
