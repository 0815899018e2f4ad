"""Attention guidance of diffusers models (PAG, SEG, SLG; SD3's joint attention included), optionally with CFG in
the same call, SLG's step window, and NAG (normalized attention guidance); SAG is in :mod:`.sag`. CFG, ICG and TSG
are the generic ``guidance.cfg`` / ``icg`` / ``tsg``: they read what the denoiser declares (``condition``,
``noise_embed_dim``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from ...denoisers import Guider
from ...errors import check
from ...guidance import registry
from ...guidance._base import Branch, Guided, PerCall
from ...guidance.cfg import cfg
from ...guidance.compose import Composed, compose
from ...guidance.protocols import OnePass
from ...guidance.weight_schedule import Weight
from .adapter import NEGATIVE, NEGATIVE_MASK, PERTURB, DiffusersDenoiser
from .flow import FlowDenoiser
from .hooks import JOINT_NAG, NAG_DEFAULTS, Perturbation, perturbed_attention


def _mark(value: bool) -> PerCall:
    return PerCall(lambda old, x, sigma: torch.full((x.shape[0],), value, dtype=torch.bool, device=x.device))


MARKED, UNMARKED = _mark(True), _mark(False)


class PerturbedFlow:
    """A :class:`~.flow.FlowDenoiser` (SD3, FLUX) whose rows marked ``perturb`` are perturbed as ``perturbation`` says
    (the flow denoiser itself knows no hooks); everything else passes through."""

    def __init__(self, inner: FlowDenoiser, perturbation: Perturbation):
        check(inner.model is not None, "attention guidance on a flow model needs FlowDenoiser(model=...)")
        assert inner.model is not None  # checked above
        self.inner, self.perturbation = inner, perturbation
        self.model: torch.nn.Module = inner.model
        self.condition = inner.condition

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        marks = cond.pop(PERTURB, None)
        if marks is None or not bool(marks.any()):
            return self.inner(x, sigma, **cond)
        with perturbed_attention(self.model, self.perturbation, marks.bool()):
            return self.inner(x, sigma, **cond)

    def with_perturbation(self, perturbation: Perturbation) -> PerturbedFlow:
        return PerturbedFlow(self.inner, perturbation)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def attention_guidance(
    denoiser: DiffusersDenoiser | FlowDenoiser | PerturbedFlow,
    w: Weight,
    mode: str,
    *,
    layers: str | Sequence[str] | None = None,
    blur_sigma: float = math.inf,
    cfg_weight: Weight | None = None,
    batched: bool = True,
    **options: Any,
) -> Guider:
    """``D = D_pert + w (D - D_pert)``: guide a diffusers denoiser with its own attention-perturbed branch.

    ``layers``: the perturbed layers (:class:`Perturbation`; default diffusers' recommended ones,
    :data:`~.hooks.DEFAULT_LAYERS`). ``cfg_weight``: CFG as well, as in the PAG paper and diffusers' PAG pipelines
    (a :func:`compose` of the two): ``D = D_u + cfg_weight (D_c - D_u) + (w - 1)(D_c - D_pert)``, i.e. diffusers'
    ``guidance_scale = cfg_weight`` and ``pag_scale = w - 1``; ``D_pert`` is perturbed with the *conditional*
    prompt, ``D_u`` takes the null condition the denoiser declares. ``batched=True``: all branches are rows of
    **one** network call (the hook perturbs only the marked rows); ``batched=False``: one call of B rows per
    branch (what diffusers' modular guiders do). SD3 (a :class:`~.flow.FlowDenoiser` of an ``SD3Transformer2DModel``):
    PAG / SEG act on the image tokens of the joint attention (diffusers' ``PAGJointAttnProcessor2_0``), SLG skips
    both streams of the selected ``JointTransformerBlock`` blocks. FLUX (``FluxTransformer2DModel``, tokens [text; image]
    in its double- and single-stream blocks): PAG sets the image tokens' attention output to their value projection
    (PAG's identity map; the text tokens attend as usual), SEG blurs the image queries, SLG skips both streams of the
    selected ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock``. ``mode`` "nag" / "sag" (with their ``options``) go to
    :func:`nag` / :func:`~.sag.sag`.
    """
    if mode in ("nag", "sag"):  # the registry reaches every attention rule through here
        from .sag import sag

        if mode == "sag" and blur_sigma != math.inf:  # SAG's own blur (default 1), not SEG's
            options["blur_sigma"] = blur_sigma
        check(mode == "sag" or blur_sigma == math.inf, "blur_sigma is for seg and sag, not nag")
        rule: Callable[..., Guider] = nag if mode == "nag" else sag  # each checks its w, cfg_weight, denoiser
        return rule(denoiser, w, layers=layers, cfg_weight=cfg_weight, **options)
    check(not options, f"{mode} takes no options {', '.join(options)}")
    return _perturbed(denoiser, w, mode, layers, blur_sigma, cfg_weight, batched)


def _perturbed(
    denoiser: DiffusersDenoiser | FlowDenoiser | PerturbedFlow,
    w: Weight,
    mode: str,
    layers: str | Sequence[str] | None,
    blur_sigma: float,
    cfg_weight: Weight | None,
    batched: bool,
) -> Guided | Composed:
    """PAG / SEG / SLG (see :func:`attention_guidance`)."""
    check(
        isinstance(denoiser, (DiffusersDenoiser, FlowDenoiser, PerturbedFlow)),
        f"{mode} needs a DiffusersDenoiser or an SD3 / FLUX FlowDenoiser, got {type(denoiser).__name__}",
    )
    check(mode in ("pag", "seg", "slg"), f"attention guidance mode must be 'pag', 'seg' or 'slg', got {mode!r}")
    pert = Perturbation(mode, layers, blur_sigma)
    if isinstance(denoiser, FlowDenoiser):
        check(
            type(denoiser.model).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel"),
            f"{mode} on flow models: SD3 and FLUX only (their joint attention); got {type(denoiser.model).__name__}",
        )
        den: DiffusersDenoiser | PerturbedFlow = PerturbedFlow(denoiser, pert)
    else:
        den = denoiser.with_perturbation(pert)
    condition = den.condition
    check(
        cfg_weight is None or (condition is not None and bool(condition.null)),
        f"cfg_weight needs the null condition: pass null_label=... (class models) or null_text=... (text models); "
        f"{type(den.model).__name__} has no default",
    )

    def other() -> (
        DiffusersDenoiser | PerturbedFlow
    ):  # distinct objects are evaluated separately (evaluate groups branches by denoiser)
        return den if batched else den.with_perturbation(cast(Perturbation, den.perturbation))

    main = Branch(den, {PERTURB: UNMARKED})
    perturbed = Guided(main, Branch(other(), {PERTURB: MARKED}), w, mode)
    if cfg_weight is None:
        return perturbed
    assert condition is not None  # checked above: cfg_weight needs the null condition
    return compose(Guided(main, Branch(other(), {**condition.null, PERTURB: UNMARKED}), cfg_weight, "cfg"), perturbed)


def pag(
    denoiser: DiffusersDenoiser | FlowDenoiser,
    w: Weight,
    *,
    layers: str | Sequence[str] | None = None,
    cfg_weight: Weight | None = None,
    batched: bool = True,
) -> Guided | Composed:
    """Perturbed-attention guidance (Ahn et al. 2024, arXiv 2403.17377); paper scale s = w - 1; with CFG at
    ``cfg_weight`` in the same call (see :func:`attention_guidance`)."""
    return _perturbed(denoiser, w, "pag", layers, math.inf, cfg_weight, batched)


def seg(
    denoiser: DiffusersDenoiser | FlowDenoiser,
    w: Weight,
    *,
    layers: str | Sequence[str] | None = None,
    blur_sigma: float = math.inf,
    cfg_weight: Weight | None = None,
    batched: bool = True,
) -> Guided | Composed:
    """Smoothed-energy guidance (Hong 2024, arXiv 2408.00760): blurred queries; paper scale = w - 1."""
    return _perturbed(denoiser, w, "seg", layers, blur_sigma, cfg_weight, batched)


def slg(
    denoiser: DiffusersDenoiser | FlowDenoiser,
    w: Weight,
    *,
    layers: str | Sequence[str] | None = None,
    cfg_weight: Weight | None = None,
    batched: bool = True,
) -> Guided | Composed:
    """Skip-layer guidance (Stable Diffusion 3.5): the reference skips the selected blocks; scale = w - 1."""
    return _perturbed(denoiser, w, "slg", layers, math.inf, cfg_weight, batched)


#: diffusers' SLG step window: the steps i of n with 0.01 n < i < 0.2 n (its SD3 pipeline and SkipLayerGuidance,
#: Stability's recommendation for SD3.5 Medium).
SLG_WINDOW = (0.01, 0.2)


def step_window(sigmas: torch.Tensor, start: float, stop: float) -> tuple[float, float]:
    """``(lo, hi)`` for ``guidance.interval``: the steps ``i`` of the grid ``sigmas`` (n steps, ending in 0) with
    ``start n < i < stop n``, as diffusers' SD3 pipeline gates SLG, i.e. sigma in ``(sigmas[last + 1], sigmas[first]]``
    (a second-order sampler's in-step evaluation follows the sigma, not the step)."""
    n = len(sigmas) - 1
    steps = [i for i in range(n) if start * n < i < stop * n]
    check(
        bool(steps),
        f"the step window ({start}, {stop}) of {n} steps holds no step (need start n < i < stop n); "
        "use more steps or give the interval",
    )
    return float(sigmas[steps[-1] + 1]), float(sigmas[steps[0]])


def _number(value: object, what: str) -> None:
    check(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        f"nag's {what} must be a finite number, got {value!r}",
    )


def _cross_nag_model(model: torch.nn.Module) -> bool:
    """A model whose cross-attentions see the prompt embedding as given (a UNet2DConditionModel without
    ``encoder_hid_proj``) or through its ``caption_projection`` (PixArt; the hook projects the negative the same way)."""
    name = type(model).__name__
    if name == "UNet2DConditionModel":
        return getattr(model, "encoder_hid_proj", None) is None
    pixart = name == "PixArtTransformer2DModel" or getattr(getattr(model, "config", None), "norm_type", None) == "ada_norm_single"
    return pixart and getattr(model, "caption_projection", None) is not None


def nag(
    denoiser: DiffusersDenoiser | FlowDenoiser,
    w: float,
    *,
    tau: float = NAG_DEFAULTS[0],
    alpha: float = NAG_DEFAULTS[1],
    layers: str | Sequence[str] | None = None,
    cfg_weight: float | None = None,
) -> OnePass | Guided:
    """Normalized attention guidance (Chen et al. 2025, arXiv 2505.21179): one network call whose cross-attentions
    extrapolate the prompt's attention output ``Z+`` away from the negative prompt's ``Z-``:
    ``Z = Z- + w (Z+ - Z-)`` (the official ``nag_scale`` is ``w``: 1 is no guidance), the per-token L1 norm of
    ``Z`` clipped to ``tau`` times that of ``Z+`` (``nag_tau``), then ``alpha Z + (1 - alpha) Z+`` (``nag_alpha``).

    The negative prompt is the denoiser's null / negative embedding (``null_text``, with ``null_mask``). Defaults:
    the official SDXL pipeline's ``tau = 2.5``, ``alpha = 0.5`` (its SD3.5 pipeline: 0.125; FLUX: 0.25); ``w``
    around 3-5 (official demos: 5). ``layers``: the attention layers (default all, as the official pipelines).

    * ``UNet2DConditionModel``: every ``attn2`` (the official ``NAGAttnProcessor2_0``);
    * PixArt (``PixArtTransformer2DModel`` / an adaLN-single ``Transformer2DModel``): every block's ``attn2``, the
      same rule; the negative caption embedding goes through the model's ``caption_projection`` as the prompt does,
      with its own padding mask (``null_mask``; none: the prompt's). The official repo has no PixArt pipeline;
    * SD3 (a :class:`~.flow.FlowDenoiser`; :class:`JointNAG`): the negative text stream runs through every block
      (the prompt's pooled projection), as the official SD3 pipeline;
    * FLUX (a :class:`~.flow.FlowDenoiser` of a ``FluxTransformer2DModel``; :class:`JointNAG`): as the official
      FLUX pipeline, the negative text stream (with its own pooled projection) runs through every double- and
      single-stream block; NAG acts on the image tokens' outputs with the **L2** norm (its
      ``NAGFluxAttnProcessor2_0``; the paper and its other processors: L1); the image stream of the double-stream
      blocks is one stream (the prompt's modulation), the single-stream blocks carry both halves.

    At ``w == 1`` the plain model (bit for bit; with ``cfg_weight`` plain CFG). ``cfg_weight``: CFG as well, in the
    same call (UNets, PixArt: 2B rows; SD3, FLUX: 3B), as the official UNet / SD3 pipelines at
    ``guidance_scale > 1``: ``D = D_u + cfg_weight (D_nag - D_u)``, ``D_u`` the plain model on the negative prompt
    (the official FLUX pipeline's ``true_cfg_scale`` does not run with NAG: here its natural extension).
    """
    model: torch.nn.Module | None = denoiser.model
    if isinstance(denoiser, FlowDenoiser) and type(model).__name__ in JOINT_NAG:
        return _joint_nag(denoiser, w, tau, alpha, layers, cfg_weight)
    check(
        isinstance(denoiser, DiffusersDenoiser) and model is not None and _cross_nag_model(model),
        "nag needs a text-conditioned diffusers UNet2DConditionModel (whose cross-attentions see the prompt "
        "embedding as given), a PixArt transformer, or an SD3 / FLUX FlowDenoiser; got "
        f"{type(model).__name__}",
    )
    assert isinstance(denoiser, DiffusersDenoiser)  # checked above
    _number(w, "w (nag_scale)")
    if cfg_weight is not None:
        _number(cfg_weight, "cfg_weight")
    null, null_mask = denoiser.null_text, denoiser.null_mask
    check(null is not None, "nag needs the negative prompt embedding: pass null_text=... (--null-text / a negative prompt)")
    assert null is not None  # checked above
    if w == 1:
        return OnePass(denoiser, denoiser, "nag") if cfg_weight is None else cfg(denoiser, cfg_weight)
    pert = Perturbation("nag", layers, nag=(float(w), tau, alpha))
    den = denoiser.with_perturbation(pert)
    pert.modules(den.model)  # layers that match nothing: an error now, not at the first call

    def negative(old: object, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return null.to(x.device).expand(x.shape[0], *null.shape[1:])

    over: dict[str, PerCall] = {NEGATIVE: PerCall(negative)}
    if null_mask is not None:
        over[NEGATIVE_MASK] = PerCall(lambda old, x, sigma: null_mask.to(x.device).expand(x.shape[0], -1))
    branch = Branch(den, {PERTURB: MARKED, **over})
    if cfg_weight is not None:  # the reference rows: unmarked, the negative prompt (one call of 2B rows)
        assert den.condition is not None  # a text model (checked above)
        ref = Branch(den, {**den.condition.null, PERTURB: UNMARKED, **over})
        return Guided(branch, ref, cfg_weight, "nag+cfg")

    def guided(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return den(x, sigma, **branch.cond(cond, x, sigma))

    return OnePass(guided, denoiser, "nag")


class JointNAG:
    """NAG on SD3 / FLUX (joint attention), as their official pipelines: the text stream also carries the negative
    prompt (its own rows), so every joint attention sees ``[image; prompt]`` and ``[image; negative]``; the image
    tokens' attention outputs are combined by NAG. guidelab runs the batch ``[x; x]`` with the text rows
    ``[prompt; negative]`` and gives both halves the combined image output, so the two image streams stay equal
    (the official code keeps one image stream where it can: half the image-stream compute). ``keys``: what the
    negative half takes from the negative prompt (SD3: the embedding; its pooled projection stays the prompt's,
    as the official SD3 pipeline; FLUX: the embedding and its pooled projection, as the official FLUX pipeline).
    ``cfg_weight``: a third block of plain rows, the negative prompt (the null condition, all its keys), in the same
    call, ``D = D_u + cfg_weight (D_nag - D_u)`` (the official SD3 pipeline at ``guidance_scale > 1``)."""

    def __init__(
        self,
        den: FlowDenoiser,
        perturbation: Perturbation,
        keys: tuple[str, ...] = ("encoder_hidden_states",),
        cfg_weight: float | None = None,
    ):
        assert den.model is not None and den.condition is not None  # checked by nag()
        self.den, self.perturbation, self.model, self.cfg_weight = den, perturbation, den.model, cfg_weight
        self.negative = Branch(den, {k: den.condition.null[k] for k in keys})
        self.null = Branch(den, den.condition.null)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        B = x.shape[0]
        blocks = [cond, self.negative.cond(cond, x, sigma)]  # the rows [prompt; negative (; unconditional)]
        if self.cfg_weight is not None:
            blocks.append(self.null.cond(cond, x, sigma))
        k = len(blocks)
        rows = {
            key: torch.cat([b[key].to(v) for b in blocks]) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == B else v
            for key, v in cond.items()
        }
        marks = (torch.arange(k * B, device=x.device) >= B) & (torch.arange(k * B, device=x.device) < 2 * B)
        with perturbed_attention(self.model, self.perturbation, marks, pairs=B):
            out = self.den(torch.cat([x] * k), torch.cat([sigma] * k), **rows)
        if self.cfg_weight is None:
            return out[:B]
        return out[2 * B :] + self.cfg_weight * (out[:B] - out[2 * B :])  # D_u + g (D_nag - D_u)


def _joint_nag(
    den: FlowDenoiser, w: float, tau: float, alpha: float, layers: str | Sequence[str] | None, cfg_weight: float | None
) -> OnePass | Guided:
    flux = type(den.model).__name__ == "FluxTransformer2DModel"
    _number(w, "w (nag_scale)")
    if cfg_weight is not None:
        _number(cfg_weight, "cfg_weight")
    cond = den.condition
    keys = ("encoder_hidden_states", "pooled_projections") if flux else ("encoder_hidden_states",)
    check(
        cond is not None and all(k in cond.null for k in keys),
        f"nag needs the negative prompt embedding (the denoiser's null condition for {' and '.join(keys)})",
    )
    if w == 1:
        return OnePass(den, den, "nag") if cfg_weight is None else cfg(den, cfg_weight)
    pert = Perturbation("nag", layers, nag=(float(w), tau, alpha))
    assert den.model is not None  # an SD3 / FLUX FlowDenoiser (checked by the caller)
    pert.modules(den.model)
    g = None if cfg_weight is None or cfg_weight == 1 else float(cfg_weight)  # cfg_weight 1: NAG alone
    return OnePass(JointNAG(den, pert, keys, g), den, "nag" if g is None else "nag+cfg")


registry.register_attention(DiffusersDenoiser, attention_guidance)  # pag / seg / slg / nag / sag entries
registry.register_attention(FlowDenoiser, attention_guidance)  # SD3: pag / seg / slg on its joint attention
