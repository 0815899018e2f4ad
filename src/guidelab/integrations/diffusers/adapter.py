"""The adapter: a diffusers network and its noise schedule as a guidelab denoiser, loaded from a local folder.

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
is micro-conditioned). CFG on text models swaps embedding and mask for the null / negative ones.

Models load from local folders only (``local_files_only=True``): nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ... import schedules
from ...denoisers import bcast
from ...errors import GuidelabError, check
from ...guidance._base import PerCall
from ...guidance.protocols import Condition
from ...guidance.tsg import KEY as TSG_KEY
from .hooks import Perturbation, perturbed_attention

_log = logging.getLogger("guidelab.integrations.diffusers")

MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel", "PixArtTransformer2DModel")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
TIMESTEP_MODES = ("interpolate", "nearest")
#: Conditioning key that marks the rows of a batch whose attention is perturbed (PAG/SEG/SLG).
PERTURB = "perturb"
#: Conditioning key of the text attention mask ([B, L], 1 = keep, 0 = discard), as diffusers names it.
MASK = "encoder_attention_mask"
#: PixArt micro-conditions, passed to the model as ``added_cond_kwargs``.
MICRO = ("resolution", "aspect_ratio")
#: Conditioning key of TSG's time-embedding offset ([B, dim]), added on its non-zero rows.
OFFSET = TSG_KEY
#: Conditioning key of NAG's negative context ([B, L, dim]) for the rows marked ``perturb``.
NEGATIVE = "nag_negative"
#: Conditioning key of that negative context's text mask ([B, L], 1 = keep, 0 = discard; PixArt's padding).
NEGATIVE_MASK = "nag_negative_mask"


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
    micro-conditioned models also ``resolution`` ([B, 2], pixels) and ``aspect_ratio`` ([B, 1]). Hooks:
    ``perturb`` ([B] bool) perturbs those rows' attention as ``perturbation`` says (PAG/SEG/SLG, see
    :func:`perturbed_attention`); ``noise_embed_offset`` ([B, noise_embed_dim], guidance.tsg) is added to the time
    embedding of the rows where it is non-zero (:class:`Perturbation` "tsg"); NAG: ``nag_negative`` ([B, L, dim], the
    negative prompt's embedding as ``encoder_hidden_states``) and its ``nag_negative_mask`` ([B, L]).

    Declared to the generic guiders: :attr:`condition` (cfg, icg: the key, the null condition, the classes) and
    :attr:`noise_embed_dim` (tsg). Null condition: ``null_label`` (the null class id; DiT: its own) or the
    empty-prompt (or negative-prompt) embedding ``null_text`` ([1, L, dim], expanded to the batch) with its
    attention mask ``null_mask`` ([1, L]).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        scheduler_config: dict,
        *,
        timesteps: str = "interpolate",
        null_label: int | None = None,
        null_text: torch.Tensor | None = None,
        null_mask: torch.Tensor | None = None,
        perturbation: Perturbation | None = None,
    ):
        check(timesteps in TIMESTEP_MODES, f"timesteps must be one of {TIMESTEP_MODES}, got {timesteps!r}")
        pred = dict(scheduler_config).get("prediction_type", "epsilon")
        check(pred in PREDICTIONS, f"prediction_type {pred!r} is not supported; allowed: {', '.join(PREDICTIONS)}")
        abar = alphas_cumprod(scheduler_config)
        check(bool((abar > 0).all()), "alpha_bar reaches 0 (zero terminal SNR): infinite sigma is not supported")
        self.model = model.eval()
        self.config = dict(scheduler_config)
        self.prediction_type, self.timestep_mode = pred, timesteps
        self.grid = ((1 - abar) / abar).sqrt()  # sigma_t, t = 0..T-1, increasing
        self._log_grid = self.grid.log()
        self._t_cache: dict[float, float] = {}  # sigma -> timestep (see timestep)
        self.cond_key = "encoder_hidden_states" if _takes_text(model) else "class_labels"
        if null_label is None and type(model).__name__ in ("DiTTransformer2DModel", "Transformer2DModel"):
            n = getattr(model.config, "num_embeds_ada_norm", None)  # DiT's label table has num_classes + 1 rows:
            null_label = n if self.cond_key == "class_labels" else None  # the last is the dropped label
        check(
            null_label is None or self.cond_key == "class_labels",
            "null_label is the null class of a class-conditional model; text models take null_text (and null_mask)",
        )
        check(null_mask is None or null_text is not None, "null_mask needs null_text (the embedding it masks)")
        self.null_label, self.null_text, self.null_mask = null_label, null_text, null_mask
        # PixArt (adaLN-single): added_cond_kwargs always, micro-conditions only if the model was trained with them
        self.adaln_single = getattr(model.config, "norm_type", None) == "ada_norm_single"
        self.micro = self.adaln_single and bool(getattr(model, "use_additional_conditions", False))
        self.perturbation = perturbation
        self.embedders = Perturbation("tsg")  # where noise_embed_offset goes

    # -- schedule ---------------------------------------------------------------------------
    @property
    def sigma_min(self) -> float:
        return float(self.grid[0])

    @property
    def sigma_max(self) -> float:
        return float(self.grid[-1])

    def sigmas(self, n: int, spacing: str = "leading", **kw: Any) -> torch.Tensor:
        """``n`` grid sigmas picked like diffusers' ``timestep_spacing`` (schedules.discrete), then 0."""
        return schedules.discrete(n, self.grid, spacing, **kw)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous (or snapped) timestep of each sigma, float64 [B] (see the module docstring); cached per sigma
        value (a run asks for the same few grid sigmas every step), the cached value is the one :meth:`_timestep`
        computed for it, so results are bit-identical."""
        dev = sigma.device if sigma.device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 there
        values = sigma.detach().to("cpu", torch.float64).tolist()
        if any(v != v for v in values):  # NaN: no cache key
            return self._timestep(sigma)
        cache = self._t_cache
        missing = sorted({v for v in values if v not in cache})
        if missing:
            if len(cache) + len(missing) > 4096:  # e.g. a continuous-sigma sampler: do not grow without bound
                cache.clear()
            fresh = self._timestep(torch.tensor(missing, dtype=torch.float64, device=dev)).tolist()
            cache.update(zip(missing, fresh, strict=True))
        return torch.tensor([cache[v] for v in values], dtype=torch.float64, device=dev)

    def _timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """:meth:`timestep` without the cache."""
        dev = sigma.device if sigma.device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 there
        ls = sigma.detach().to(dev, torch.float64).clamp_min(1e-30).log()
        if self._log_grid.device != dev:
            self._log_grid = self._log_grid.to(dev)
        lg = self._log_grid
        if self.timestep_mode == "nearest":
            return (ls[:, None] - lg[None, :]).abs().argmin(1).double()
        i = torch.searchsorted(lg, ls).clamp(1, lg.numel() - 1)  # lg[i-1] <= ls < lg[i]
        frac = (ls - lg[i - 1]) / (lg[i] - lg[i - 1])
        return ((i - 1).double() + frac).clamp(0, lg.numel() - 1)

    # -- conditioning -----------------------------------------------------------------------
    @property
    def condition(self) -> Condition | None:
        """What cfg and icg read: ``class_labels`` with the null class (if any) and :attr:`num_classes`, or
        ``encoder_hidden_states`` with the null overrides of :meth:`null_text_overrides`; None if unconditional."""
        if self.cond_key == "encoder_hidden_states":
            return Condition(self.cond_key, self.null_text_overrides())
        if not _class_conditional(self.model):
            return None
        return Condition(self.cond_key, {} if self.null_label is None else {self.cond_key: self.null_label}, self.num_classes)

    def null_text_overrides(self) -> dict:
        """The null branch of a text model: ``null_text`` expanded to the batch and, if given, ``null_mask``
        (without it the null branch keeps the call's mask); empty without ``null_text``. Both branches run as one
        call when they carry the same keys: give the prompts a mask when the null has one (all ones if unpadded).
        """
        if self.null_text is None:
            return {}
        null, null_mask = self.null_text, self.null_mask

        def embedding(old: torch.Tensor) -> torch.Tensor:
            check(
                old.shape[1:] == null.shape[1:],
                f"null/negative embedding {list(null.shape[1:])} and prompt "
                f"embedding {list(old.shape[1:])} differ: pad both to the same length (and pass attention masks)",
            )
            return null.to(old).expand(old.shape[0], *null.shape[1:])

        out: dict = {self.cond_key: embedding}
        if null_mask is not None:
            out[MASK] = PerCall(lambda old, x, sigma: null_mask.to(x.device).expand(x.shape[0], -1))
        return out

    @property
    def num_classes(self) -> int | None:
        """Number of real classes of a class-conditional model (ICG's random labels), else ``None``.

        DiT: ``num_embeds_ada_norm`` (its table's extra last row is the null label). UNets with a label table
        (``num_class_embeds``, ``class_embed_type=None``): its size, less the last row if that is ``null_label``.
        """
        if self.cond_key != "class_labels":
            return None
        c = self.model.config
        if type(self.model).__name__ in ("DiTTransformer2DModel", "Transformer2DModel"):
            return getattr(c, "num_embeds_ada_norm", None)
        n = getattr(c, "num_class_embeds", None)
        if n is None or getattr(c, "class_embed_type", None) is not None:
            return None
        return n - 1 if self.null_label == n - 1 else n

    @property
    def noise_embed_dim(self) -> int:
        """Size of the time-embedding vector ``noise_embed_offset`` shifts (guidance.tsg's vector form); a selection
        of embedders (``with_perturbation(Perturbation("tsg", layers))``) that matches none is an error."""
        return self.embedders.embed_dim(self.model)

    # -- the denoiser -----------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        cond = {k: v for k, v in cond.items() if v is not None}  # e.g. no attention mask on either CFG branch
        marks = cond.pop(PERTURB, None)
        offset = cond.pop(OFFSET, None)
        negative = cond.pop(NEGATIVE, None)
        negative_mask = cond.pop(NEGATIVE_MASK, None)
        s = bcast(sigma.to(x.dtype), x)
        dtype = next(self.model.parameters()).dtype
        x_vp = (x / (1 + s**2).sqrt()).to(dtype)
        t = self.timestep(sigma).to(device=x.device, dtype=torch.float32)
        cond = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in cond.items()}
        if self.adaln_single:  # PixArt: micro-conditions or None
            added = {k: cond.pop(k, None) for k in MICRO}
            check(
                not self.micro or all(v is not None for v in added.values()),
                "this PixArt model is micro-conditioned (use_additional_conditions): pass resolution [B, 2] "
                "(height, width in pixels) and aspect_ratio [B, 1] in cond",
            )
            for k, width in zip(MICRO, (2, 1)):
                v = added[k]
                check(
                    v is None or (isinstance(v, torch.Tensor) and tuple(v.shape) == (x.shape[0], width)),
                    f"PixArt micro-condition {k} must be a [batch, {width}] tensor = [{x.shape[0]}, {width}], "
                    f"got {list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}",
                )
            cond["added_cond_kwargs"] = added
        with contextlib.ExitStack() as hooks:
            if marks is not None and bool(marks.any()):
                check(self.perturbation is not None, "perturb= needs a denoiser made with perturbation=Perturbation(...)")
                assert self.perturbation is not None  # checked above
                extra = {} if negative is None else {"negative": negative, "negative_mask": negative_mask}  # nag
                hooks.enter_context(perturbed_attention(self.model, self.perturbation, marks.bool(), **extra))
            if offset is not None:
                hooks.enter_context(self._time_embedding_offset(offset, x.shape[0]))
            out = self.model(x_vp, timestep=t, **cond, return_dict=False)[0]  # Transformer2DModel: keyword only
        if out.shape[1] == 2 * x.shape[1]:  # learned variance: keep the mean part
            out = out[:, : x.shape[1]]
        out = out.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x / (1 + s**2) - s / (1 + s**2).sqrt() * out
        return out

    def _time_embedding_offset(self, offset: torch.Tensor, B: int) -> contextlib.AbstractContextManager[None]:
        """The hook adding ``offset`` [B, dim] to the time embedding of its non-zero rows (a no-op if none)."""
        dim = self.noise_embed_dim
        check(
            offset.ndim == 2 and offset.shape == (B, dim),
            f"{OFFSET} must be [batch, noise_embed_dim] = [{B}, {dim}] "
            f"(the time-embedding vector of {type(self.model).__name__}), got {list(offset.shape)}",
        )
        rows = offset.ne(0).any(1)
        if not bool(rows.any()):
            return contextlib.nullcontext()
        return perturbed_attention(self.model, self.embedders, rows, offset=offset)

    def with_perturbation(self, perturbation: Perturbation) -> DiffusersDenoiser:
        """The same network and schedule, perturbing the rows marked ``perturb`` with ``perturbation``
        (PAG/SEG/SLG), or (mode "tsg") adding ``noise_embed_offset`` to the time embedders it selects."""
        new = copy.copy(self)
        if perturbation.mode == "tsg":
            new.embedders = perturbation
        else:
            new.perturbation = perturbation
        return new


def _class_conditional(model: torch.nn.Module) -> bool:
    """A label table (DiT, a UNet with ``num_class_embeds``) or a class embedding (``class_embed_type``)."""
    c = model.config
    if type(model).__name__ in ("DiTTransformer2DModel", "Transformer2DModel"):
        return getattr(c, "num_embeds_ada_norm", None) is not None
    return getattr(c, "num_class_embeds", None) is not None or getattr(c, "class_embed_type", None) is not None


def _takes_text(model: torch.nn.Module) -> bool:
    return type(model).__name__ in ("UNet2DConditionModel", "PixArtTransformer2DModel") or (
        type(model).__name__ == "Transformer2DModel" and getattr(model.config, "cross_attention_dim", None) is not None
    )


# ---------------------------------------------------------------------------------------------
# Loading from a local folder.


def _read_json(p: Path) -> dict:
    with open(p) as f:
        return json.load(f)


def _find(path: Path, subfolder: str | None) -> tuple[Path, dict]:
    """(model folder, scheduler config) of a pipeline folder (model_index.json, unet/ or transformer/,
    scheduler/) or of a model folder with config.json and scheduler_config.json."""
    check(
        path.is_dir(),
        f"diffusers model folder {str(path)!r} does not exist (models load from local folders only; "
        "nothing is downloaded from the hub)",
    )
    if subfolder is None and (path / "model_index.json").exists():
        subfolder = next((s for s in ("unet", "transformer") if (path / s / "config.json").exists()), None)
        check(subfolder is not None, f"{path} has model_index.json but no unet/ or transformer/ with a config.json")
    model_dir = path / subfolder if subfolder else path
    check((model_dir / "config.json").exists(), f"{model_dir} has no config.json (expected a diffusers model folder)")
    for p in (path / "scheduler" / "scheduler_config.json", model_dir / "scheduler_config.json", path / "scheduler_config.json"):
        if p.exists():
            return model_dir, _read_json(p)
    raise GuidelabError(f"no scheduler_config.json in {path}/scheduler, {model_dir} or {path}: the noise schedule is needed")


def _weights_format(model_dir: Path, allow_pickle: bool) -> bool:
    """Whether to load ``.safetensors`` (True) or, with ``allow_pickle``, pickled ``.bin`` weights (False); a folder
    with only ``.bin`` weights is one clear error without the opt-in, and a logged warning with it."""
    if any(model_dir.glob("*.safetensors")):
        return True
    pickled = sorted(p.name for p in model_dir.glob("*.bin"))
    check(
        bool(pickled) and allow_pickle,
        f"{model_dir} has no .safetensors weights"
        + (
            f", only pickled {', '.join(pickled)} (unpickling can run code): convert it to safetensors, or pass "
            "allow_pickle=True (CLI: --allow-bin) if you trust the file"
            if pickled
            else " (guidelab loads safetensors only)"
        ),
    )
    _log.warning("%s: loading pickled weights %s (allow_pickle=True): unpickling can run code", model_dir, ", ".join(pickled))
    return False


def load_model(
    path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> tuple[torch.nn.Module, dict]:
    """``(model, scheduler_config)`` from a local folder; ``from_pretrained(..., local_files_only=True,
    use_safetensors=True)``. Pickled ``.bin`` weights only with ``allow_pickle=True`` (a warning is logged)."""
    import diffusers

    model_dir, sched = _find(Path(path), subfolder)
    name = _read_json(model_dir / "config.json").get("_class_name")
    check(name in MODEL_CLASSES, f"{model_dir}: model class {name!r} is not supported; allowed: {', '.join(MODEL_CLASSES)}")
    assert name is not None  # checked above: one of MODEL_CLASSES
    safetensors = _weights_format(model_dir, allow_pickle)
    try:
        model = getattr(diffusers, name).from_pretrained(
            model_dir, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False, use_safetensors=safetensors
        )
    except (OSError, ValueError) as e:
        raise GuidelabError(f"{model_dir}: cannot load {name}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), sched


def load(
    path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    timesteps: str = "interpolate",
    null_label: int | None = None,
    null_text: torch.Tensor | None = None,
    null_mask: torch.Tensor | None = None,
    allow_pickle: bool = False,
) -> DiffusersDenoiser:
    """A :class:`DiffusersDenoiser` from a local diffusers folder (a missing folder is one clear error; pickled
    ``.bin`` weights only with ``allow_pickle=True``, see :func:`load_model`)."""
    model, sched = load_model(path, subfolder=subfolder, dtype=dtype, device=device, allow_pickle=allow_pickle)
    return DiffusersDenoiser(model, sched, timesteps=timesteps, null_label=null_label, null_text=null_text, null_mask=null_mask)


SCHEDULES = ("karras", "leading", "trailing", "linspace")


def make_sigmas(den: DiffusersDenoiser, steps: int, schedule: str = "karras") -> torch.Tensor:
    """``karras`` between the model's grid ends, or the grid timesteps picked by diffusers' spacing names."""
    check(schedule in SCHEDULES, f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if schedule == "karras":
        return schedules.karras(steps, den.sigma_min, den.sigma_max)
    return den.sigmas(steps, schedule)
