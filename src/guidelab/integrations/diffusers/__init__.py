"""diffusers models as guidelab denoisers, and their guiders (PAG, SEG, SLG through row-marking hooks; ICG, TSG).

* :mod:`.adapter`: :class:`DiffusersDenoiser` (a diffusers network + its noise schedule in EDM space),
  :func:`load` / :func:`load_model` (local folders only), the model's sigmas;
* :mod:`.hooks`: :class:`Perturbation` and :func:`perturbed_attention` (perturb only the marked rows);
* :mod:`.flow`: :class:`FlowDenoiser` (rectified flow as an EDM denoiser), the flow scheduler's grid;
* :mod:`.sdxl`: :class:`SDXLDenoiser` (SDXL's pooled text embedding and size ids as two conditioning keys);
* :mod:`.flux`: FLUX's packed latents, position ids, guidance input and time grid;
* :mod:`.scheduler`: the folder's scheduler config honoured (``schedule="pipeline"``, x0 clipping /
  thresholding, the equal sampler, PNDM's PLMS, refused settings);
* :mod:`.pipelines`: :func:`load_pipeline` and ``Pipeline.generate``: prompt in, image out (docs/PIPELINES.md);
* :mod:`.guiders`: :func:`attention_guidance` (:func:`pag`, :func:`seg`, :func:`slg`), SLG's step window, :func:`nag`
  (UNets, PixArt, SD3, FLUX);
* :mod:`.sag`: :func:`sag` (self-attention guidance: blur where the middle block attends).

CFG, ICG and TSG are the generic ``guidance.cfg(den, w)``, ``guidance.icg(den, w)``, ``guidance.tsg(den, w)``: the
denoiser declares ``condition`` and ``noise_embed_dim``. Sampling runs that write files (``guidelab diffusers``)
are application layer: :func:`guidelab.app.diffusers_generate.generate`.

See docs/DIFFUSERS.md.
"""

from .adapter import (
    MASK,
    MICRO,
    MODEL_CLASSES,
    NEGATIVE,
    NEGATIVE_MASK,
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
from .flow import FLOW_MODELS, SIGMA_T1, FlowDenoiser, flow_sigmas, flux_mu
from .guiders import (
    MARKED,
    SLG_WINDOW,
    UNMARKED,
    JointNAG,
    PerturbedFlow,
    attention_guidance,
    nag,
    pag,
    seg,
    slg,
    step_window,
)
from .hooks import DEFAULT_LAYERS, Perturbation, perturbed_attention
from .pipelines import PIPELINES, Pipeline, load_pipeline
from .sag import sag
from .sdxl import SDXLDenoiser

__all__ = [
    "DEFAULT_LAYERS",
    "NEGATIVE",
    "NEGATIVE_MASK",
    "FLOW_MODELS",
    "SIGMA_T1",
    "FlowDenoiser",
    "flow_sigmas",
    "flux_mu",
    "MARKED",
    "MASK",
    "MICRO",
    "MODEL_CLASSES",
    "OFFSET",
    "PERTURB",
    "PIPELINES",
    "Pipeline",
    "PREDICTIONS",
    "SCHEDULES",
    "SLG_WINDOW",
    "TIMESTEP_MODES",
    "UNMARKED",
    "DiffusersDenoiser",
    "SDXLDenoiser",
    "Perturbation",
    "alphas_cumprod",
    "attention_guidance",
    "load",
    "load_pipeline",
    "load_model",
    "make_sigmas",
    "JointNAG",
    "PerturbedFlow",
    "nag",
    "sag",
    "pag",
    "perturbed_attention",
    "seg",
    "slg",
    "step_window",
]
