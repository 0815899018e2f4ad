"""Attention guidance of diffusers models (PAG, SEG, SLG), optionally with CFG in the same call, and SLG's step
window. CFG, ICG and TSG are the generic ``guidance.cfg`` / ``icg`` / ``tsg``: they read what the denoiser declares
(``condition``, ``noise_embed_dim``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch

from ...errors import check
from ...guidance import registry
from ...guidance._base import Branch, Guided, PerCall
from ...guidance.compose import Composed, compose
from .adapter import PERTURB, DiffusersDenoiser
from .hooks import Perturbation


def _mark(value: bool) -> PerCall:
    return PerCall(lambda old, x, sigma: torch.full((x.shape[0],), value, dtype=torch.bool, device=x.device))


MARKED, UNMARKED = _mark(True), _mark(False)


def attention_guidance(
    denoiser: DiffusersDenoiser,
    w,
    mode: str,
    *,
    layers: str | Sequence[str] | None = None,
    blur_sigma: float = math.inf,
    cfg_weight=None,
    batched: bool = True,
) -> Guided | Composed:
    """``D = D_pert + w (D - D_pert)``: guide a diffusers denoiser with its own attention-perturbed branch.

    ``layers``: the perturbed layers (:class:`Perturbation`; default diffusers' recommended ones,
    :data:`~.hooks.DEFAULT_LAYERS`). ``cfg_weight``: CFG as well, as in the PAG paper and diffusers' PAG pipelines
    (a :func:`compose` of the two): ``D = D_u + cfg_weight (D_c - D_u) + (w - 1)(D_c - D_pert)``, i.e. diffusers'
    ``guidance_scale = cfg_weight`` and ``pag_scale = w - 1``; ``D_pert`` is perturbed with the *conditional*
    prompt, ``D_u`` takes the null condition the denoiser declares. ``batched=True``: all branches are rows of
    **one** network call (the hook perturbs only the marked rows); ``batched=False``: one call of B rows per
    branch (what diffusers' modular guiders do).
    """
    check(isinstance(denoiser, DiffusersDenoiser), f"{mode} needs a DiffusersDenoiser, got {type(denoiser).__name__}")
    check(mode in ("pag", "seg", "slg"), f"attention guidance mode must be 'pag', 'seg' or 'slg', got {mode!r}")
    den = denoiser.with_perturbation(Perturbation(mode, layers, blur_sigma))
    condition = den.condition
    check(
        cfg_weight is None or (condition is not None and bool(condition.null)),
        f"cfg_weight needs the null condition: pass null_label=... (class models) or null_text=... (text models); "
        f"{type(den.model).__name__} has no default",
    )
    # distinct objects are evaluated separately (evaluate groups branches by denoiser)
    other = (lambda: den) if batched else (lambda: den.with_perturbation(cast(Perturbation, den.perturbation)))
    main = Branch(den, {PERTURB: UNMARKED})
    perturbed = Guided(main, Branch(other(), {PERTURB: MARKED}), w, mode)
    if cfg_weight is None:
        return perturbed
    assert condition is not None  # checked above: cfg_weight needs the null condition
    return compose(Guided(main, Branch(other(), {**condition.null, PERTURB: UNMARKED}), cfg_weight, "cfg"), perturbed)


def pag(denoiser, w, *, layers=None, cfg_weight=None, batched: bool = True) -> Guided | Composed:
    """Perturbed-attention guidance (Ahn et al. 2024, arXiv 2403.17377); paper scale s = w - 1; with CFG at
    ``cfg_weight`` in the same call (see :func:`attention_guidance`)."""
    return attention_guidance(denoiser, w, "pag", layers=layers, cfg_weight=cfg_weight, batched=batched)


def seg(denoiser, w, *, layers=None, blur_sigma: float = math.inf, cfg_weight=None, batched: bool = True) -> Guided | Composed:
    """Smoothed-energy guidance (Hong 2024, arXiv 2408.00760): blurred queries; paper scale = w - 1."""
    return attention_guidance(denoiser, w, "seg", layers=layers, blur_sigma=blur_sigma, cfg_weight=cfg_weight, batched=batched)


def slg(denoiser, w, *, layers=None, cfg_weight=None, batched: bool = True) -> Guided | Composed:
    """Skip-layer guidance (Stable Diffusion 3.5): the reference skips the selected blocks; scale = w - 1."""
    return attention_guidance(denoiser, w, "slg", layers=layers, cfg_weight=cfg_weight, batched=batched)


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


registry.register_attention(DiffusersDenoiser, attention_guidance)  # pag / seg / slg entries of the registry
