"""The guider registry: one entry per guider name, read by the CLI, jobs, sweeps, distillation and the
diffusers integration.

An entry (:class:`GuiderSpec`) says what the guider is (summary, paper), which options it takes (typed,
with defaults), what it needs from the models (:data:`NEEDS`) and from the sampler, its cost (network
evaluations per denoiser call at ``w != 1``) and how to build it from a :class:`Context`. Adding a guider
is one entry in :data:`GUIDERS`. ``w = 1`` is no guidance throughout (``D = D_ref + w (D - D_ref)``).

    den = registry.build("tsg", registry.Context(net, w=2.0, seeds=seeds, options=["s=0.3"]))
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence, cast

from ..denoisers import Denoiser
from ..errors import GuidelabError, check
from ._base import Guided
from .apg import apg
from .autoguidance import autoguidance
from .cfg import cfg
from .cfg_norm import cfg_norm
from .cfg_zero_star import cfg_zero_star
from .cfgpp import cfgpp
from .classifier import classifier
from .dynamic_thresholding import dynamic_thresholding
from .fdg import fdg
from .icg import icg
from .interval import interval
from .mag import mag
from .protocols import Guider, OnePass
from .rescale import rescale
from .self_guide import self_guidance
from .tcfg import tcfg
from .tsg import tsg
from .weak_copy import lowp_autoguidance, pruned_autoguidance

_TYPES = {int: "an integer", float: "a float", str: "a string", bool: "true or false", tuple: "a comma-separated list"}


@dataclass(frozen=True)
class Option:
    """A guider keyword: ``--option name=VALUE`` is parsed to ``type`` (``tuple``: comma-separated strings;
    ``none`` / ``null`` give None where the default is None)."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple = ()

    def parse(self, value: Any, guider: str = "") -> Any:
        """``value`` (text, or a value from a JSON config) as this option's type; a bad one is a GuidelabError."""
        bad = GuidelabError(f"{guider} option {self.name} must be {_TYPES[self.type]}, got {value!r}".lstrip())
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            check(self.default is None, f"{guider} option {self.name} cannot be None".lstrip())
            return None
        if isinstance(value, str):
            text = value.strip()
            try:
                if self.type is bool:
                    check(text.lower() in ("true", "false", "1", "0"), "")
                    v: Any = text.lower() in ("true", "1")
                elif self.type is tuple:
                    v = tuple(s.strip() for s in text.split(",") if s.strip())
                else:
                    v = self.type(text)
            except ValueError:
                raise bad from None
        elif self.type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
        elif self.type is tuple and isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
            v = tuple(value)
        elif isinstance(value, self.type) and not (self.type is int and isinstance(value, bool)):
            v = value
        else:
            raise bad
        check(
            not self.choices or v in self.choices,
            f"{guider} option {self.name} must be one of {', '.join(map(str, self.choices))}, got {v!r}".lstrip(),
        )
        return v


@dataclass
class Context:
    """What a builder gets. ``main``: the denoiser to guide; ``w``: the weight (a number or a [B] tensor;
    cfgpp: lambda in [0, 1]); ``guide``: the weaker network (autoguidance) or an unconditional one (cfg,
    cfgpp); ``classifier``: a noise-aware classifier; ``seeds``: the batch's per-sample seeds (icg, tsg);
    ``options``: guider keywords (``["k=v", ...]`` or a dict, checked by :func:`parse_options`);
    ``interval``: guide only for ``lo < sigma <= hi``; ``unconditional``: the network is called without the
    label (classifier guidance: the label is only the classifier's target); ``sampler``: checked against the
    entry's ``sampler_needs`` when given; ``what``: how errors name the main model."""

    main: Any
    w: Any = 1.0
    guide: Any = None
    classifier: Any = None
    seeds: Sequence[int] | None = None
    options: Mapping[str, Any] | Sequence[str] = field(default_factory=dict)
    interval: tuple[float, float] | None = None
    unconditional: bool = False
    sampler: str | None = None
    what: str = "the model"


@dataclass(frozen=True)
class GuiderSpec:
    """One guider: ``needs`` (keys of :data:`NEEDS`), ``sampler_needs`` (features of
    ``samplers.info(name).supports``), ``nfe`` (network evaluations per denoiser call at ``w != 1``),
    ``linear`` (``D_ref + w (D - D_ref)`` of two branches: a base for the rules apg / rescale /
    cfg_zero_star, composable and distillable) and ``build(ctx) -> denoiser`` (options already parsed)."""

    name: str
    summary: str
    reference: str
    options: tuple[Option, ...]
    needs: frozenset[str]
    sampler_needs: frozenset[str]
    nfe: int
    build: Callable[[Context], Any]
    linear: bool = False


def _extra_scalar(den: object) -> str | None:
    return getattr(den, "extra_scalar", None)


def _distilled_key(den: object) -> str:
    from ..training.student import distilled_info

    return (distilled_info(den) or {}).get("key") or "w"


def _conditional(den: object) -> bool:
    return getattr(den, "condition", None) is not None  # guidance.Condition, declared by the denoiser


def _null(den: object) -> bool:
    cond = getattr(den, "condition", None)
    return cond is not None and bool(cond.null)


def _noise_embed(ctx: Context) -> bool:
    """TSG's vector form (default) needs a declared ``noise_embed_dim``; the scalar form (or an explicit
    ``dim``) a network that sees its noise level."""
    opts = dict(ctx.options) if isinstance(ctx.options, Mapping) else {}
    if getattr(ctx.main, "noise_embed_dim", None) is not None:
        return True
    return (opts.get("form") == "scalar" or opts.get("dim") is not None) and bool(getattr(ctx.main, "noise_cond", False))


#: Model families whose attention can be perturbed on marked rows (PAG / SEG / SLG) register
#: ``(denoiser class, attention_guidance(den, w, mode, **options))`` here when they are imported (the diffusers
#: integration does), so the registry itself imports no integration (no import cycle).
_ATTENTION: list[tuple[type, Callable[..., Any]]] = []


def register_attention(cls: type, build: Callable[..., Any]) -> None:
    """Declare that denoisers of ``cls`` support attention guidance, built by ``build(den, w, mode, **options)``."""
    if all(c is not cls for c, _ in _ATTENTION):
        _ATTENTION.append((cls, build))


def _attention_builder(den: object) -> Callable[..., Any] | None:
    return next((b for c, b in _ATTENTION if isinstance(den, c)), None)


def _attention(den: object) -> bool:
    return _attention_builder(den) is not None


#: need -> (is it met?, what is missing). ``null_label`` is also met by an unconditional ``guide``.
NEEDS: dict[str, tuple[Callable[[Context], bool], str]] = {
    "null_label": (
        lambda c: c.guide is not None or _null(c.main),
        "a class-conditional network (its null label) or an unconditional guide network (--guide)",
    ),
    "condition": (lambda c: _conditional(c.main), "a conditional network (class labels or an embedding)"),
    "guide": (lambda c: c.guide is not None, "--guide (a weaker checkpoint or run folder)"),
    "classifier": (lambda c: c.classifier is not None, "a noise-aware classifier"),
    "noise_embed": (_noise_embed, "a network with a noise-level embedding (noise_embed_dim; or --option form=scalar)"),
    "attention": (lambda c: _attention(c.main), "a diffusers model (attention hooks; guidelab diffusers)"),
    "scalar:beta": (lambda c: _extra_scalar(c.main) == "beta", "a network trained with recipe=gft (extra scalar input 'beta')"),
    "scalar:w": (
        lambda c: _extra_scalar(c.main) is not None and _extra_scalar(c.main) == _distilled_key(c.main),
        "a distilled student (extra scalar input 'w', guidelab distill)",
    ),
}


def _arg(fn: Callable[..., Any], name: str, type_: type, help: str, choices: tuple = ()) -> Option:
    """An option whose default is the guidance function's own (one source of truth)."""
    return Option(name, type_, inspect.signature(fn).parameters[name].default, help, choices)


# ---------------------------------------------------------------------------------------------
# Builders: the generic guidance functions (they read the denoiser's condition / noise embedding,
# so one entry serves guidelab networks and diffusers models).


def _opts(ctx: Context, *drop: str) -> dict:
    return {k: v for k, v in dict(cast(Mapping[str, Any], ctx.options)).items() if k not in drop}


def _none(ctx: Context) -> Denoiser:
    if _extra_scalar(ctx.main) == "beta":  # a GFT network at w = 1 is the conditional model
        from ..training.gft import gft_denoiser

        return gft_denoiser(ctx.main, 1.0)
    if _extra_scalar(ctx.main) is not None:  # a distilled student at w = 1
        from ..training.student import distilled_denoiser

        return distilled_denoiser(ctx.main, 1.0, key=_distilled_key(ctx.main))
    return ctx.main


def _cfg(ctx: Context) -> Guided:
    return cfg(ctx.main, ctx.w, uncond=ctx.guide)


def _autoguidance(ctx: Context) -> Guided:
    return autoguidance(ctx.main, ctx.guide, ctx.w)


def _self_guide(mode: str) -> Callable[[Context], Guided]:
    def build(ctx: Context) -> Guided:
        o = _opts(ctx)
        return self_guidance(ctx.main, ctx.w, mode=mode, seeds=ctx.seeds, **o)

    return build


_SELF_BLOCKS = Option("blocks", tuple, None, "comma-separated block names (guidance.self_guide.blocks; default: the middle one)")


def _icg(ctx: Context) -> Guided:
    return icg(ctx.main, ctx.w, seeds=ctx.seeds, **_opts(ctx))


def _tsg(ctx: Context) -> Guided:
    return tsg(ctx.main, ctx.w, seeds=ctx.seeds, **_opts(ctx))


def _cfgpp(ctx: Context) -> Guided:
    return cfgpp(ctx.main, ctx.w, uncond=ctx.guide)


def _base(ctx: Context) -> Guided:
    """The linear guider a rule (apg, rescale, cfg_zero_star) acts on: option ``base``, default cfg."""
    return get(dict(cast(Mapping[str, Any], ctx.options)).get("base", "cfg")).build(replace(ctx, options={}))


def _apg(ctx: Context) -> Guided:
    return apg(_base(ctx), **_opts(ctx, "base"))


def _rescale(ctx: Context) -> Guided:
    return rescale(_base(ctx), **_opts(ctx, "base"))


def _cfg_zero_star(ctx: Context) -> Guided:
    return cfg_zero_star(_base(ctx), **_opts(ctx, "base"))


def _rule(fn: Callable[..., Guider]) -> Callable[[Context], Guider]:
    def build(ctx: Context) -> Guider:
        return fn(_base(ctx), **_opts(ctx, "base"))

    return build


def _cads(ctx: Context) -> Guider:
    from .cads import cads

    return cads(_base(ctx), **_opts(ctx, "base"))


def _perp_neg(ctx: Context) -> Guided:
    from .perp_neg import perp_neg

    o = _opts(ctx, "base")
    key = getattr(getattr(ctx.main, "condition", None), "key", "label")
    neg = o.pop("negative", None)
    check(neg is not None, "perp_neg needs --option negative=LABEL (the class to steer away from)")
    return perp_neg(_base(ctx), {key: neg}, **o)


def _classifier(ctx: Context) -> Guider:
    return classifier(ctx.main, ctx.classifier, ctx.w, pass_label=not ctx.unconditional)


def _one_pass(at: Callable[[Any], Callable[..., Any]], ctx: Context, name: str) -> OnePass:
    """``at(w)``: the network at weight w, one evaluation per call; unguided (for intervals) is at w = 1."""
    return OnePass(at(ctx.w), at(1.0), name)


def _gft(ctx: Context) -> OnePass:
    from ..training.gft import gft_denoiser

    return _one_pass(lambda w: gft_denoiser(ctx.main, w), ctx, "gft")


def _distilled(ctx: Context) -> OnePass:
    from ..training.student import distilled_denoiser

    key = _distilled_key(ctx.main)
    return _one_pass(lambda w: distilled_denoiser(ctx.main, w, key=key), ctx, "distilled")


def _attention_guidance(mode: str) -> Callable[[Context], Any]:
    def build(ctx: Context) -> Any:
        attention_guidance = _attention_builder(ctx.main)
        check(attention_guidance is not None, f"{mode} needs a diffusers model (attention hooks)")
        assert attention_guidance is not None
        return attention_guidance(ctx.main, ctx.w, mode, **_opts(ctx))

    return build


# ---------------------------------------------------------------------------------------------
# The entries.

_BASES = ("cfg", "autoguidance", "icg", "tsg")
_BASE = Option("base", str, "cfg", "the linear guider the rule acts on", _BASES)
_F = frozenset
_LAYERS = Option(
    "layers", tuple, None, "comma-separated substrings of attention layer names (default: the integration's recommended layers)"
)
_CFG_WEIGHT = Option("cfg_weight", float, None, "CFG at this weight as well, in the same batched call")


def _spec(
    name: str,
    summary: str,
    reference: str,
    build: Callable[[Context], Any],
    *,
    options: Iterable[Option] = (),
    needs: Iterable[str] = (),
    sampler_needs: Iterable[str] = (),
    nfe: int = 2,
    linear: bool = False,
) -> GuiderSpec:
    return GuiderSpec(name, summary, reference, tuple(options), _F(needs), _F(sampler_needs), nfe, build, linear)


GUIDERS: dict[str, GuiderSpec] = {
    s.name: s
    for s in [
        _spec("none", "no guidance (a gft network or distilled student at w = 1)", "", _none, nfe=1),
        _spec(
            "cfg",
            "classifier-free guidance: the null label, or --guide an unconditional network",
            "Ho & Salimans 2022, arXiv 2207.12598",
            _cfg,
            needs=["null_label"],
            linear=True,
        ),
        _spec(
            "autoguidance",
            "guide with a weaker version of the model (--guide)",
            "Karras et al. 2024, arXiv 2406.02507",
            _autoguidance,
            needs=["guide"],
            linear=True,
        ),
        _spec(
            "autoguidance_skip",
            "autoguidance with the network itself, some blocks skipped, as the guide (one batched call)",
            "Karras et al. 2024, arXiv 2406.02507; diffusers AutoGuidance (layer skip)",
            _self_guide("skip"),
            linear=True,
            options=[_SELF_BLOCKS],
        ),
        _spec(
            "autoguidance_dropout",
            "autoguidance with the network itself, dropout p on some blocks, as the guide (one batched call)",
            "Karras et al. 2024, arXiv 2406.02507; diffusers AutoGuidance (dropout)",
            _self_guide("dropout"),
            linear=True,
            options=[_SELF_BLOCKS, _arg(self_guidance, "p", float, "dropout probability on the selected blocks")],
        ),
        _spec(
            "autoguidance_lowp",
            "autoguidance with the network's weights rounded to bf16 / fp16 as the guide",
            "Karras et al. 2024, arXiv 2406.02507 (a cheaper copy as the weaker model)",
            lambda ctx: lowp_autoguidance(ctx.main, ctx.w, **_opts(ctx)),
            linear=True,
            options=[_arg(lowp_autoguidance, "dtype", str, "precision of the guide's weights", ("bf16", "fp16"))],
        ),
        _spec(
            "autoguidance_pruned",
            "autoguidance with a magnitude-pruned copy of the network as the guide",
            "Karras et al. 2024, arXiv 2406.02507 (a cheaper copy as the weaker model)",
            lambda ctx: pruned_autoguidance(ctx.main, ctx.w, **_opts(ctx)),
            linear=True,
            options=[_arg(pruned_autoguidance, "fraction", float, "fraction of each weight tensor zeroed (smallest |w|)")],
        ),
        _spec(
            "icg",
            "independent condition guidance: a random condition as the reference",
            "Sadat et al. 2025, arXiv 2407.02687",
            _icg,
            needs=["condition"],
            linear=True,
            options=[_arg(icg, "num_classes", int, "classes the random label is drawn from (default: the network's)")],
        ),
        _spec(
            "tsg",
            "time-step guidance: a perturbed noise-level embedding as the reference",
            "Sadat et al. 2025, arXiv 2407.02687",
            _tsg,
            needs=["noise_embed"],
            linear=True,
            options=[
                _arg(tsg, "s", float, "perturbation scale"),
                _arg(tsg, "alpha", float, "time exponent"),
                _arg(tsg, "form", str, "vector (the embedding vector, default) or scalar (c_noise)", ("vector", "scalar")),
                _arg(tsg, "dim", int, "size of the perturbed vector (default: the network's noise_embed_dim)"),
            ],
        ),
        _spec(
            "cfgpp",
            "CFG++: CFG inside the step, renoised with the unconditional prediction; w is lambda in [0, 1]",
            "Chung et al. 2024, arXiv 2406.08070",
            _cfgpp,
            needs=["null_label"],
            sampler_needs=["renoise"],
        ),
        _spec(
            "apg",
            "adaptive projected guidance on a linear guider (--option base=cfg)",
            "Sadat et al. 2024, arXiv 2410.02416",
            _apg,
            needs=["null_label"],
            options=[
                _BASE,
                _arg(apg, "eta", float, "weight of the parallel component"),
                _arg(apg, "r", float, "norm threshold of the update (none: no clipping)"),
                _arg(apg, "beta", float, "momentum (negative in the paper)"),
            ],
        ),
        _spec(
            "rescale",
            "CFG with the result's std rescaled to the main branch's",
            "Lin et al. 2024, arXiv 2305.08891",
            _rescale,
            needs=["null_label"],
            options=[
                _BASE,
                _arg(rescale, "phi", float, "rescale mix"),
                _arg(rescale, "space", str, "space of the std", ("v", "eps", "x0")),
            ],
        ),
        _spec(
            "cfg_zero_star",
            "CFG-Zero*: optimised scale and zero-initialised first steps",
            "Fan et al. 2025, arXiv 2503.18886",
            _cfg_zero_star,
            needs=["null_label"],
            options=[
                _BASE,
                _arg(cfg_zero_star, "zero_steps", int, "first steps zeroed (default 1; 0: off)"),
                _arg(cfg_zero_star, "zero_init_sigma", float, "zero where sigma >= this, instead of zero_steps"),
                _arg(cfg_zero_star, "space", str, "space of the rule", ("flow", "eps", "x0", "v")),
            ],
        ),
        _spec(
            "tcfg",
            "TCFG: the unconditional branch's tangential component removed (SVD of both branches)",
            "Kwon et al. 2025, arXiv 2503.18137",
            _rule(tcfg),
            needs=["null_label"],
            options=[_BASE, _arg(tcfg, "space", str, "space of the SVD", ("eps", "x0", "v", "flow"))],
        ),
        _spec(
            "fdg",
            "frequency-decoupled guidance: w on high frequencies, w_low on the low-pass band (images)",
            "Sadat et al. 2025, arXiv 2506.19713",
            _rule(fdg),
            needs=["null_label"],
            options=[
                _BASE,
                _arg(fdg, "w_low", float, "weight of the low-pass band"),
                _arg(fdg, "levels", int, "pyramid levels"),
                _arg(fdg, "space", str, "space", ("x0", "eps", "v", "flow")),
            ],
        ),
        _spec(
            "cfg_norm",
            "CFG-Renorm / CFGNorm: the guided norm capped at the conditional's",
            "Zhuo et al. 2024 (Lumina-Next), arXiv 2406.18583",
            _rule(cfg_norm),
            needs=["null_label"],
            options=[
                _BASE,
                _arg(cfg_norm, "per", str, "norm per channel vector or per sample", ("channel", "sample")),
                _arg(cfg_norm, "space", str, "space", ("x0", "flow", "eps", "v")),
            ],
        ),
        _spec(
            "mag",
            "MAMBO-G: the weight damped by exp(-alpha ||update|| / ||uncond||)",
            "Zhu et al. 2025, arXiv 2508.03442",
            _rule(mag),
            needs=["null_label"],
            options=[
                _BASE,
                _arg(mag, "alpha", float, "damping strength"),
                _arg(mag, "space", str, "space", ("flow", "eps", "x0", "v")),
            ],
        ),
        _spec(
            "dynamic_thresholding",
            "Imagen's dynamic thresholding of the guided x0 prediction",
            "Saharia et al. 2022, arXiv 2205.11487",
            _rule(dynamic_thresholding),
            needs=["null_label"],
            options=[
                _BASE,
                _arg(dynamic_thresholding, "percentile", float, "quantile of |x0|"),
                _arg(dynamic_thresholding, "max_value", float, "data range (Imagen: 1)"),
            ],
        ),
        _spec(
            "perp_neg",
            "Perp-Neg: a negative label, its component along the positive direction removed",
            "Armandpour et al. 2023, arXiv 2304.04968",
            _perp_neg,
            needs=["null_label", "condition"],
            nfe=3,
            options=[
                _BASE,
                Option("negative", int, None, "the negative class label (required)"),
                Option("neg_w", float, 1.0, "weight of the negative direction"),
            ],
        ),
        _spec(
            "cads",
            "CADS: the condition annealed with scheduled noise early in the run (diversity at high w)",
            "Sadat et al. 2024, arXiv 2310.17347",
            _cads,
            needs=["null_label"],
            options=[
                Option("base", str, "cfg", "the guider whose condition is annealed", ("cfg", "tsg")),
                Option("tau1", float, 0.6, "normalised time below which the condition is clean"),
                Option("tau2", float, 0.9, "normalised time above which it is pure noise"),
                Option("noise_scale", float, 0.25, "noise scale s"),
                Option("psi", float, 1.0, "mix of the rescaled noisy condition"),
            ],
        ),
        _spec(
            "classifier",
            "classifier guidance: the gradient of a noise-aware classifier's log p(y | x)",
            "Dhariwal & Nichol 2021, arXiv 2105.05233",
            _classifier,
            needs=["classifier"],
            nfe=1,
        ),
        _spec(
            "gft",
            "guidance-free training: a recipe=gft network at beta = 1/w, one evaluation",
            "Chen et al. 2025, arXiv 2501.15420",
            _gft,
            needs=["scalar:beta"],
            nfe=1,
        ),
        _spec(
            "distilled",
            "a guidance-distilled student with the scalar input w, one evaluation",
            "Meng et al. 2023, arXiv 2210.03142",
            _distilled,
            needs=["scalar:w"],
            nfe=1,
        ),
        _spec(
            "pag",
            "perturbed-attention guidance (diffusers models)",
            "Ahn et al. 2024, arXiv 2403.17377",
            _attention_guidance("pag"),
            needs=["attention"],
            linear=True,
            options=[_LAYERS, _CFG_WEIGHT],
        ),
        _spec(
            "seg",
            "smoothed-energy guidance: blurred attention queries (diffusers models)",
            "Hong 2024, arXiv 2408.00760",
            _attention_guidance("seg"),
            needs=["attention"],
            linear=True,
            options=[_LAYERS, Option("blur_sigma", float, math.inf, "query blur (inf: uniform attention)"), _CFG_WEIGHT],
        ),
        _spec(
            "slg",
            "skip-layer guidance: the reference skips the selected blocks (diffusers models)",
            "Stable Diffusion 3.5",
            _attention_guidance("slg"),
            needs=["attention"],
            linear=True,
            options=[_LAYERS, _CFG_WEIGHT],
        ),
        _spec(
            "nag",
            "normalized attention guidance: cross-attention outputs pushed away from the negative prompt's (diffusers)",
            "Chen et al. 2025, arXiv 2505.21179",
            _attention_guidance("nag"),
            needs=["attention", "null_label"],
            nfe=1,
            options=[
                _LAYERS,
                Option("tau", float, 2.5, "norm-ratio cap (nag_tau; L1 norm, L2 on FLUX as its official processor)"),
                Option(
                    "alpha",
                    float,
                    0.5,
                    "blend of the extrapolated and the prompt's attention (nag_alpha; official 0.125 SD3.5, 0.25 FLUX)",
                ),
                _CFG_WEIGHT,
            ],
        ),
        _spec(
            "sag",
            "self-attention guidance: the reference sees x with its most attended regions blurred (diffusers UNets)",
            "Hong et al. 2023, arXiv 2210.00939",
            _attention_guidance("sag"),
            needs=["attention"],
            options=[
                _LAYERS,
                Option("blur_sigma", float, 1.0, "Gaussian blur sigma (latent pixels)"),
                Option("kernel_size", int, 9, "Gaussian blur kernel size (odd)"),
                Option("threshold", float, 1.0, "mask: tokens receiving more than this attention (1: the mean)"),
                _CFG_WEIGHT,
            ],
        ),
    ]
}


def names(*, needs: Iterable[str] | None = None, without: Iterable[str] = ()) -> list[str]:
    """Guider names, in registry order; ``needs``: only those whose needs are all in this set (what a model
    family offers); ``without``: leave out those needing any of these."""
    have = None if needs is None else set(needs)
    return [n for n, s in GUIDERS.items() if (have is None or s.needs <= have) and not s.needs & set(without)]


def get(name: str) -> GuiderSpec:
    """The entry called ``name``."""
    check(name in GUIDERS, f"unknown guider {name!r}; allowed: {', '.join(GUIDERS)}")
    return GUIDERS[name]


def summaries(names_: Iterable[str]) -> str:
    """``name: summary`` of each guider, for help texts."""
    return "; ".join(f"{n}: {get(n).summary}" for n in names_)


def parse_options(name: str, options: Mapping[str, Any] | Sequence[str] | None) -> dict:
    """``["k=v", ...]`` or ``{k: v}`` -> ``{k: typed v}`` for guider ``name``; unknown keys are an error."""
    spec = get(name)
    allowed = {o.name: o for o in spec.options}
    if isinstance(options, Mapping):
        items = list(options.items())
    else:
        items = []
        for item in options or ():
            key, eq, value = str(item).partition("=")
            check(bool(eq and key.strip()), f"--option takes KEY=VALUE, got {item!r}")
            items.append((key.strip(), value))
    out = {}
    for key, value in items:
        check(key in allowed, f"{name} takes no option {key}; allowed: {', '.join(allowed) or 'none'}")
        out[key] = allowed[key].parse(value, name)
    return out


def unmet(name: str, ctx: Context) -> list[str]:
    """What ``ctx`` lacks for guider ``name`` (empty: it can be built), one line per unmet need."""
    spec = get(name)
    needs = spec.needs
    base = dict(ctx.options).get("base") if isinstance(ctx.options, Mapping) else None
    if base is not None:  # a rule needs what its base needs
        needs = get(base).needs
    out = [f"{name} needs {NEEDS[n][1]}; {ctx.what} has none" for n in sorted(needs) if not NEEDS[n][0](ctx)]
    if name != "none" and not needs & {"scalar:beta", "scalar:w"} and _extra_scalar(ctx.main) is not None:
        s = _extra_scalar(ctx.main)
        out.append(
            f"{name} needs a network without an extra scalar input; {ctx.what} has {s!r} "
            f"(use --guider {'gft' if s == 'beta' else 'distilled'})"
        )
    return out


def build(name: str, ctx: Context) -> Denoiser:
    """The guided denoiser ``name`` for ``ctx``: options parsed, needs checked (one error listing every
    unmet need), sampler support checked when ``ctx.sampler`` is given, ``ctx.interval`` applied."""
    spec = get(name)
    ctx = replace(ctx, options=parse_options(name, ctx.options))
    problems = unmet(name, ctx)
    check(not problems, "; ".join(problems))
    if ctx.sampler is not None and spec.sampler_needs:
        from .. import samplers

        can = [s for s in samplers.names() if spec.sampler_needs <= samplers.info(s).supports]
        check(
            spec.sampler_needs <= samplers.info(ctx.sampler).supports,
            f"{name} needs a sampler with {', '.join(sorted(spec.sampler_needs))}: {', '.join(can)}; got {ctx.sampler}",
        )
    den = spec.build(ctx)
    if ctx.interval is not None and name != "none":
        den = interval(den, float(ctx.interval[0]), float(ctx.interval[1]))
    return den
