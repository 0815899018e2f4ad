"""Guidance-weight schedules w(sigma); the documentation is :func:`weight_schedule`'s docstring."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch

from ..errors import GuidelabError, check
from .protocols import Run

KINDS = ("constant", "linear", "cosine", "interval", "steps")


@dataclass(frozen=True)
class WeightSchedule:
    """A guidance weight that depends on the noise level or the step: ``at(sigma, run) -> w [batch]``."""

    kind: str
    w_start: float
    w_end: float
    options: dict = field(default_factory=dict)

    def progress(self, sigma: torch.Tensor, run: Run | None) -> torch.Tensor:
        """0 at the first (largest) sigma, 1 at the last; per sample [batch], float64."""
        o = self.options
        if o.get("over", "time") == "time":
            if run is None:
                raise GuidelabError(
                    f"a {self.kind} weight schedule over time reads the sampler run's step: call the "
                    "guider through a sampler, or use over='sigma' with sigma_max / sigma_min"
                )
            n = len(run.sigmas) - 1
            return torch.full(sigma.shape, run.step / max(n - 1, 1), dtype=torch.float64)
        hi, lo = o.get("sigma_max"), o.get("sigma_min")
        if hi is None or lo is None:
            if run is None:
                raise GuidelabError("a weight schedule over sigma needs sigma_max and sigma_min, or a sampler run")
            s = run.sigmas.double()
            hi, lo = (float(s[0]) if hi is None else hi), (float(s[s > 0].min()) if lo is None else lo)
        return ((hi - sigma.double().cpu()) / (hi - lo)).clamp(0, 1)

    def at(self, sigma: torch.Tensor, run: Run | None) -> torch.Tensor:
        """The weight of each sample at ``sigma`` [batch] (``run``: the guider's Run, or None)."""
        a, b, o = self.w_start, self.w_end, self.options
        if self.kind == "constant":
            w = torch.full(sigma.shape, a, dtype=torch.float64)
        elif self.kind == "interval":  # Kynkäänniemi et al. 2024, sigma gate
            s = sigma.double().cpu()
            w = torch.where((s > o["sigma_lo"]) & (s <= o["sigma_hi"]), a, b)
        elif self.kind == "steps":  # official code: start <= i <= stop
            if run is None:
                raise GuidelabError(
                    "a steps weight schedule gates by the sampler run's step index: call the guider through a sampler"
                )
            w = torch.full(sigma.shape, a if o["start"] <= run.step <= o["stop"] else b, dtype=torch.float64)
        else:
            p = self.progress(sigma, run)
            if self.kind == "cosine":
                p = (1 - torch.cos(math.pi * p)) / 2
            w = a + (b - a) * p
        return w.to(sigma.device)

    def __repr__(self) -> str:
        extra = "".join(f",{k}={v}" for k, v in self.options.items())
        return f"{self.kind}:{self.w_start:g}-{self.w_end:g}{extra}"


#: A guidance weight: a number, a per-sample [batch] tensor or a :class:`WeightSchedule` (``w = 1``: no guidance).
Weight: TypeAlias = "float | torch.Tensor | WeightSchedule"


def weight_schedule(kind: str, w_start: float, w_end: float | None = None, **options: Any) -> WeightSchedule:
    """A guidance weight schedule, accepted wherever a guider takes ``w`` (cfg, autoguidance, icg, tsg and
    the rules on them). ``w_start`` at the first (largest) sigma, ``w_end`` at the last; ``w = 1``: no guidance.

    * ``constant``: ``w_start`` everywhere (``w_end`` None or equal);
    * ``linear`` / ``cosine`` (Wang et al. 2024, arXiv 2404.13040): ``w = w_start + (w_end - w_start) p``,
      cosine with ``p -> (1 - cos(pi p)) / 2``; ``over="time"`` (default): ``p = i / (N - 1)`` at step ``i``
      of the run's ``N`` steps; ``over="sigma"``: ``p = (sigma_max - sigma) / (sigma_max - sigma_min)``
      (defaults: the run's first and last nonzero sigma);
    * ``interval``: ``w_start`` for ``sigma in (sigma_lo, sigma_hi]``, ``w_end`` (default 1) outside;
    * ``steps``: ``w_start`` for steps ``start <= i <= stop`` of the run, ``w_end`` (default 1) outside: the
      guidance-interval paper's official gate (both Heun evaluations of a step share it; EDM2-XXL FID:
      ``weight_schedule("steps", 2.0, start=17, stop=22)`` on 32 Heun steps).

    Unlike :func:`~guidelab.guidance.interval`, an interval / steps schedule still evaluates both branches
    where ``w = 1`` (2 NFE); the result there is the main branch bit for bit for the linear guiders, every
    rule of ``Guided.with_rule`` and perp_neg (:func:`keep_unguided`; tested).
    """
    check(kind in KINDS, f"unknown weight schedule {kind!r}; allowed: {', '.join(KINDS)}")
    default_end = 1.0 if kind in ("interval", "steps") else w_start
    w_end = default_end if w_end is None else w_end
    for name, v in (("w_start", w_start), ("w_end", w_end)):
        check(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            f"weight schedule {name} must be a finite number, got {v!r}",
        )
    allowed = {
        "constant": (),
        "linear": ("over", "sigma_max", "sigma_min"),
        "cosine": ("over", "sigma_max", "sigma_min"),
        "interval": ("sigma_lo", "sigma_hi"),
        "steps": ("start", "stop"),
    }[kind]
    bad = set(options) - set(allowed)
    check(not bad, f"{kind} weight schedule takes no option {', '.join(sorted(bad))}; allowed: {', '.join(allowed) or 'none'}")
    check(kind != "constant" or w_end == w_start, f"a constant weight schedule has one weight, got {w_start} and {w_end}")
    check(options.get("over", "time") in ("time", "sigma"), f"over must be 'time' or 'sigma', got {options.get('over')!r}")
    if kind == "interval":
        check(
            "sigma_lo" in options and "sigma_hi" in options and 0 <= options["sigma_lo"] < options["sigma_hi"],
            f"an interval weight schedule needs 0 <= sigma_lo < sigma_hi, got {options}",
        )
    if kind == "steps":
        check(
            all(isinstance(options.get(k), int) for k in ("start", "stop")) and 0 <= options["start"] <= options["stop"],
            f"a steps weight schedule needs integer steps 0 <= start <= stop, got {options}",
        )
    return WeightSchedule(kind, float(w_start), float(w_end), dict(options))


def parse_weight(text: str) -> float | WeightSchedule:
    """``--weight`` text: a number (``2.5``) or ``KIND:START-END[:key=value,...]``, e.g. ``linear:1-4``,
    ``cosine:4-1:over=sigma``, ``steps:2-1:start=17,stop=22``, ``interval:2-1:sigma_lo=0.28,sigma_hi=1.61``."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    kind, _, rest = text.partition(":")
    ws, _, opts = rest.partition(":")
    a, dash, b = ws.partition("-")
    try:
        w_start, w_end = float(a), (float(b) if dash else None)
        options: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in opts.split(","))):
            k, eq, v = item.partition("=")
            check(bool(eq), "")
            options[k.strip()] = v.strip() if k.strip() == "over" else (int(v) if k.strip() in ("start", "stop") else float(v))
    except (ValueError, GuidelabError):
        raise GuidelabError(
            f"--weight must be a number or KIND:START-END[:key=value,...] (e.g. linear:1-4), got {text!r}"
        ) from None
    return weight_schedule(kind.strip(), w_start, w_end, **options)


def keep_unguided(w: float | torch.Tensor, D: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` with the main branch ``D`` wherever the (broadcast, per-sample) weight is exactly 1: a rule
    under a schedule or a per-sample weight is then bit-identical to no guidance where ``w = 1``, as it is
    at the number ``w = 1`` (the rules' space round trips and clipping would otherwise touch those rows)."""
    if not isinstance(w, torch.Tensor):
        return out
    return torch.where(w == 1, D, out)
