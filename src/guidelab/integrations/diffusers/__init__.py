"""diffusers models as guidelab denoisers, and their guiders (PAG, SEG, SLG through row-marking hooks; ICG, TSG).

* :mod:`.adapter`: :class:`DiffusersDenoiser` (a diffusers network + its noise schedule in EDM space),
  :func:`load` / :func:`load_model` (local folders only), the model's sigmas;
* :mod:`.hooks`: :class:`Perturbation` and :func:`perturbed_attention` (perturb only the marked rows);
* :mod:`.guiders`: :func:`attention_guidance` (:func:`pag`, :func:`seg`, :func:`slg`), :func:`make_guider`;
* :mod:`.generate`: :func:`generate` / :func:`save_outputs` (sampling runs that write files).

See docs/DIFFUSERS.md.
"""

from .adapter import (
    MASK,
    MICRO,
    MODEL_CLASSES,
    OFFSET,
    PERTURB,
    PREDICTIONS,
    SCHEDULES,
    TIMESTEP_MODES,
    DiffusersDenoiser,
    alphas_cumprod,
    load,
    load_model,
    make_sigmas,
)
from .generate import generate, save_outputs
from .guiders import GUIDERS, MARKED, OPTIONS, UNMARKED, attention_guidance, cfg, icg, make_guider, pag, seg, slg, tsg
from .hooks import Perturbation, perturbed_attention

__all__ = ["MASK", "MICRO", "MODEL_CLASSES", "OFFSET", "PERTURB", "PREDICTIONS", "SCHEDULES", "TIMESTEP_MODES",
           "DiffusersDenoiser", "alphas_cumprod", "load", "load_model", "make_sigmas", "generate", "save_outputs",
           "GUIDERS", "MARKED", "OPTIONS", "UNMARKED", "attention_guidance", "cfg", "icg", "make_guider", "pag", "seg",
           "slg", "tsg", "Perturbation", "perturbed_attention"]
