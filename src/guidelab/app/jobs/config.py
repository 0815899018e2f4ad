"""What a sampling job samples (:class:`SampleConfig`) and its validation, before anything is loaded."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

from ... import samplers
from ...errors import check
from ...guidance import registry

#: Guiders of guidelab networks and exact worlds (the registry's entries that need no diffusers model).
GUIDERS = tuple(registry.names(without={"attention"}))
#: Guiders on an exact world (its guide is the unconditional tree("AB")).
WORLD_GUIDERS = tuple(registry.names(needs={"null_label"}))

#: Sampler keywords that the job itself passes (never ``--sampler-option``).
_OWN = ("cond", "callback", "progress", "noise")


def check_sampler_options(sampler: str, options: dict) -> None:
    """Each key of ``options`` is a keyword of ``sampler`` (``--sampler-option``); else one error line naming the
    allowed ones."""
    params = inspect.signature(samplers.get(sampler)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if n not in _OWN and p.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in options:
        check(
            key in allowed,
            f"sampler {sampler} takes no option {key}; allowed: {', '.join(allowed) or 'none'}",
        )


@dataclass
class SampleConfig:
    """What to sample. ``world``: an exact tree ("A", "B", "AB") or ``model``: a checkpoint (.safetensors)
    or a training run folder (post-hoc EMA of ``sigma_rel`` at ``step``, default the last snapshot).

    ``label``: a class (int), ``"balanced"`` (sample *i* gets ``seed_i % num_classes``: per sample, batch
    invariant) or None (no label: the null label of a class-conditional network). ``unconditional``: call
    the network without the label (its null label) while ``label`` stays the target of classifier guidance
    (and of class accuracy). ``guider``: a name of the guider registry (:data:`GUIDERS`,
    :mod:`guidelab.guidance.registry`; ``w = 1``: no guidance) with its keywords ``guider_options``;
    ``guide``: autoguidance's weaker checkpoint or run folder (``guide_sigma_rel``, ``guide_step``), cfg's
    unconditional checkpoint (default: the null label; exact world: tree("AB")), or classifier
    guidance's noise-aware classifier (default: the packaged noise-aware digits one).

    ``w``: a number or a weight schedule's text (:func:`guidelab.guidance.parse_weight`, e.g.
    ``"linear:1-4"``; job.json records the text and a resume compares it); :meth:`weight` parses it.

    ``interval = (lo, hi)`` guides only for lo < sigma <= hi. Schedule: karras(steps, sigma_min,
    sigma_max, rho); ``sigma_max`` None is 80 for image networks (EDM) and 5 otherwise; a checkpoint
    that carries its own grid (``meta.distilled.sigmas``, progressive distillation) is sampled on exactly that
    grid (``sampler`` None: euler there, heun otherwise); ``sampler_options``: the sampler's keywords
    (e.g. ``s_churn``; keys checked against the sampler's keywords; dpm_solver_v3's ``ems``: a statistics file or
    ``"degenerate"``, default ``MODEL.ems.safetensors`` next to the checkpoint or the run folder's file for the job's
    σ_rel / step, :func:`~.assembly.ems_file`).
    ``chunk``: networks see blocks of this many rows, each sample in the row
    ``seed % chunk``, so samples do not depend on the shard size (see :class:`~.assembly.Counted`; 0: off;
    shards that are multiples of ``chunk`` waste nothing).
    """

    world: str | None = "A"
    model: str | None = None
    guide: str | None = None
    guider: str = "none"
    w: float | str = 1.0
    label: int | str | None = None
    unconditional: bool = False
    sampler: str | None = None
    steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float | None = None
    rho: float = 7.0
    dtype: str = "float32"
    interval: tuple[float, float] | None = None
    sigma_rel: float = 0.10
    step: int | None = None
    guide_sigma_rel: float = 0.10
    guide_step: int | None = None
    chunk: int = 64
    guider_options: dict = field(default_factory=dict)
    sampler_options: dict = field(default_factory=dict)

    def weight(self):
        """``w`` as a guider takes it: a float, or a :class:`~guidelab.guidance.WeightSchedule` parsed from its text."""
        if isinstance(self.w, str):
            from ...guidance import parse_weight

            return parse_weight(self.w)
        return self.w

    def weight_text(self) -> str:
        """``w`` as text: ``2`` or ``linear:1-4``."""
        return self.w.strip() if isinstance(self.w, str) else f"{self.w:g}"

    def validate(self) -> None:
        check(
            isinstance(self.w, str) or (isinstance(self.w, (int, float)) and not isinstance(self.w, bool)),
            f"--weight must be a number or a schedule (e.g. linear:1-4), got {self.w!r}",
        )
        w = self.weight()
        check(not isinstance(w, float) or math.isfinite(w), f"--weight must be a finite number (1 = no guidance), got {self.w!r}")
        check(
            isinstance(w, (int, float)) or self.guider != "none",
            f"--weight {self.weight_text()} is a schedule but --guider is none (it needs a guider with a weight)",
        )
        check(
            (self.world is None) != (self.model is None), "give exactly one of --world (an exact tree) or --model (a checkpoint)"
        )
        check(self.guider in GUIDERS, f"unknown guider {self.guider!r}; allowed: {', '.join(GUIDERS)}")
        spec = registry.get(self.guider)
        registry.parse_options(self.guider, self.guider_options)
        check(self.dtype in ("float32", "float64"), f"--dtype must be float32 or float64, got {self.dtype!r}")
        check(
            self.world is None or self.guider in WORLD_GUIDERS,
            f"guider {self.guider} needs a model; on the exact world use {', '.join(WORLD_GUIDERS)}",
        )
        check(isinstance(self.steps, int) and self.steps >= 2, f"--steps must be an integer >= 2, got {self.steps!r}")
        check(isinstance(self.chunk, int) and self.chunk >= 0, f"chunk must be an integer >= 0, got {self.chunk!r}")
        check(
            self.label is None
            or self.label == "balanced"
            or (isinstance(self.label, int) and not isinstance(self.label, bool) and self.label >= 0),
            f"--label must be a class index >= 0 or 'balanced', got {self.label!r}",
        )
        check(
            self.guider != "classifier" or self.label is not None,
            "classifier guidance needs a target class: --label N or balanced",
        )
        uses_label = [n for n in GUIDERS if registry.get(n).needs & {"null_label", "condition"}]
        check(
            not self.unconditional or not spec.needs & {"null_label", "condition"},
            f"unconditional sampling cannot use {self.guider}: it guides with the label ({', '.join(uses_label)} do)",
        )
        check(isinstance(self.sampler_options, dict), f"sampler_options must be a dict, got {self.sampler_options!r}")
        if self.sampler is not None:
            samplers.get(self.sampler)
            check_sampler_options(self.sampler, self.sampler_options)
        for path in (self.model, self.guide):
            check(path is None or Path(path).exists(), f"checkpoint not found: {path}")
        check(
            self.world is None or self.guide is None,
            f"the exact world's guide is fixed (tree('AB')); --guide {self.guide} applies to a --model only",
        )
        check(self.interval is None or self.guider != "none", "--interval needs a guider (it limits where guidance applies)")
        for name, v in (("--sigma-rel", self.sigma_rel), ("--guide-sigma-rel", self.guide_sigma_rel)):
            check(isinstance(v, (int, float)) and 0 < v < 0.2887, f"{name} must be in (0, 0.2887), got {v!r}")
        for name, step, path in (("--step", self.step, self.model), ("--guide-step", self.guide_step, self.guide)):
            check(
                step is None or (path is not None and Path(path).is_dir()),
                f"{name} picks a snapshot of a training run folder; {path or 'nothing'} is not one",
            )
        check(
            self.interval is None or (len(self.interval) == 2 and 0 <= self.interval[0] < self.interval[1]),
            f"--interval must be lo-hi with 0 <= lo < hi, got {self.interval!r}",
        )
