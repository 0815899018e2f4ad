"""Guiders of diffusers models: attention guidance (PAG, SEG, SLG) with optional CFG in the same call, ICG, TSG,
and :func:`make_guider` (a guider by name)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ... import guidance
from ...errors import check
from ...guidance._base import Branch, Guided, PerCall
from ...guidance.compose import Composed, compose
from .adapter import PERTURB, DiffusersDenoiser
from .hooks import Perturbation


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


GUIDERS = ("none", "cfg", "autoguidance", "pag", "seg", "slg", "icg", "tsg", "apg")
#: Keyword options of each guider (``options=`` / ``--option KEY=VALUE``).
OPTIONS = {"icg": ("num_classes",), "tsg": ("s", "alpha"), "apg": ("eta", "r", "beta")}


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
