"""Sweeps: guidance methods x weights (x intervals) -> a results table, best weight per method, Pareto front.

Every cell is a resumable :func:`guidelab.app.jobs.sample` job in ``out/samples/<cell>``. Metrics: on
points, against a reference set (exact samples of the world, or given reference samples) on raw
coordinates; on a digits model (images [1, 8, 8]) without a reference, the digits metrics of
:class:`guidelab.app.evaluate.DigitsMetrics` (class accuracy, FD, precision / recall, density / coverage in
the digits-classifier features, against the test split). Every row records NFE per sample (counted)
and sampling seconds. Writes ``out/results.csv`` and ``out/results.json`` (rows, best, pareto, settings).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .. import metrics, toy
from .._io import atomic_write
from ..errors import check
from ..guidance import registry
from ..log import get_logger, release
from ..metrics import features
from . import jobs, provenance
from .evaluate import DigitsMetrics, nfe_of

log = get_logger(__name__)

#: metric -> True when higher is better.
HIGHER_IS_BETTER = {
    "mean_logp": True,
    "precision": True,
    "recall": True,
    "density": True,
    "coverage": True,
    "fd": False,
    "kid": False,
    "sliced_wasserstein": False,
    "class_accuracy": True,
}


def weight_text(w) -> str:
    """A weight as the results show it: ``2`` or a schedule's text ``linear:1-4``."""
    return w.strip() if isinstance(w, str) else f"{float(w):g}"


def weight_number(w) -> float:
    """A number for plots and sorting: the weight, or a schedule's starting weight (``w_start``)."""
    if isinstance(w, str):
        from ..guidance import parse_weight

        v = parse_weight(w)
        return float(v) if isinstance(v, float) else v.w_start
    return float(w)


def cell_name(method: str, w, interval) -> str:
    """``cfg_w2``, ``cfg_wlinear_1-4`` (a schedule: its text made path-safe), ``+ _i0.3-5`` with an interval."""
    text = weight_text(w)
    name = f"{method}_w{re.sub(r'[^A-Za-z0-9.=-]+', '_', text) if isinstance(w, str) else text}"
    return name + (f"_i{interval[0]:g}-{interval[1]:g}" if interval else "")


def measure(x: torch.Tensor, ref: torch.Tensor, world=None, ref_radii: dict | None = None) -> dict:
    """All point-cloud metrics of samples ``x`` [N, D] against ``ref`` [M, D] (raw coordinates).
    ``ref_radii``: the reference's k-NN radii (:func:`guidelab.metrics.knn_radii_multi` with k = 3, 5),
    computed once per reference set by the caller."""
    q = metrics.prdc(ref, x, k_pr=3, k_dc=5, real_radii=ref_radii)
    fs_x, fs_r = metrics.FeatureStats(x.shape[1]).update(x), metrics.FeatureStats(ref.shape[1]).update(ref)
    row = {
        "precision": q["precision"],
        "recall": q["recall"],
        "density": q["density"],
        "coverage": q["coverage"],
        "fd": metrics.fid_from_stats(fs_r, fs_x),
        "kid": metrics.kid(ref, x, subsets=10, subset_size=min(1000, len(x), len(ref)))[0],
        "sliced_wasserstein": metrics.sliced_wasserstein(ref, x),
    }
    if world is not None:
        row["mean_logp"] = metrics.mean_logp(world, x)
    return row


def pareto_front(rows: list[dict], quality: str, diversity: str) -> list[int]:
    """Indices of rows not dominated in (quality, diversity), each oriented by HIGHER_IS_BETTER."""
    sq = 1 if HIGHER_IS_BETTER[quality] else -1
    sd = 1 if HIGHER_IS_BETTER[diversity] else -1
    pts = [(sq * r[quality], sd * r[diversity]) for r in rows]
    return [i for i, (q, d) in enumerate(pts) if not any(q2 >= q and d2 >= d and (q2 > q or d2 > d) for q2, d2 in pts)]


def best_per_method(rows: list[dict], metric: str) -> dict[str, dict]:
    """The row with the best ``metric`` for each method."""
    s = 1 if HIGHER_IS_BETTER[metric] else -1
    best = {}
    for r in rows:
        if r["method"] not in best or s * r[metric] > s * best[r["method"]][metric]:
            best[r["method"]] = r
    return best


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep runs. ``methods``: {guider name (:data:`guidelab.app.jobs.GUIDERS`): [weights]} (``none``:
    one cell); ``intervals``: (lo, hi) or None per cell row; ``guides``: checkpoint per method (cfg: the
    unconditional model, classifier: the noise-aware classifier; default ``base.guide``); ``options``: guider
    keywords (``["k=v", ...]`` or a dict), each given to the methods that take it; weights are numbers or
    weight-schedule texts (``"linear:1-4"``, :func:`guidelab.guidance.parse_weight`); ``metric`` chooses the
    best weight per method, ``quality`` / ``diversity`` are the Pareto axes; ``ref_seed``: the exact
    world's reference draw; ``classifier``: the clean digits classifier of the digits metrics (default: the
    packaged one, its sha256 pinned)."""

    methods: Mapping[str, Sequence[float | str]]
    n: int = 2048
    seed_start: int = 0
    shard_size: int = 1024
    intervals: Sequence[tuple[float, float] | None] = (None,)
    metric: str = "fd"
    quality: str = "precision"
    diversity: str = "recall"
    guides: Mapping[str, str | None] = field(default_factory=dict)
    options: Mapping[str, Any] | Sequence[str] = ()
    ref_seed: int = 10**9
    classifier: str | None = None

    def validate(self) -> None:
        for m in (self.metric, self.quality, self.diversity):
            check(m in HIGHER_IS_BETTER, f"unknown metric {m!r}; allowed: {', '.join(HIGHER_IS_BETTER)}")
        check(bool(self.methods), "give at least one method")
        for m in self.methods:
            check(m in jobs.GUIDERS, f"unknown guider {m!r}; allowed: {', '.join(jobs.GUIDERS)}")
        self.options_for(None)

    def options_for(self, method: str | None) -> dict:
        """The keywords of ``options`` that ``method`` takes (None: check every key is taken by some method)."""
        items = dict(self.options) if isinstance(self.options, Mapping) else dict(o.partition("=")[::2] for o in self.options)
        takes = {m: {o.name for o in registry.get(m).options} for m in self.methods}
        unused = sorted(k for k in items if not any(k in t for t in takes.values()))
        check(
            not unused,
            f"no method of the sweep takes option {', '.join(unused)}; "
            f"{'; '.join(f'{m}: {sorted(t)}' for m, t in takes.items() if t) or 'none takes options'}",
        )
        return {} if method is None else registry.parse_options(method, {k: v for k, v in items.items() if k in takes[method]})


def run(
    out: str | os.PathLike,
    base: jobs.SampleConfig,
    sweep: SweepConfig,
    *,
    reference: torch.Tensor | None = None,
    device: str | None = None,
    progress: bool = False,
) -> dict:
    """Sample and measure every (method, weight, interval) cell of ``sweep`` on ``base``; returns and writes
    the results. Reference: ``reference`` or, on an exact world, ``n`` exact samples drawn with
    ``ref_seed``; a digits model without ``reference`` uses the digits metrics. A class-conditional model
    with ``base.label`` None samples balanced labels. ``progress``: one bar over every cell's samples
    (with ETA) and a phase line per metric pass on the ``guidelab`` logger. results.json records the
    ``provenance`` (:mod:`guidelab.app.provenance`) and each row's ``weight`` text.
    """
    sweep.validate()
    n, metric, quality, diversity = sweep.n, sweep.metric, sweep.quality, sweep.diversity
    out = Path(out)
    world = toy.tree(base.world, dtype=torch.float64) if base.world is not None else None
    digits = None
    if base.model is not None:
        if progress:
            log.info("loading %s", base.model)
        probe = jobs.build_balanced(base, device or "cpu", classifier="classifier" in sweep.methods)
        base = probe.cfg
        if reference is None and probe.shape == (1, 8, 8):
            if progress:
                log.info("loading the digits classifier and the test split's features (the metrics' reference)")
            digits = DigitsMetrics(sweep.classifier)
    if reference is None and digits is None:
        check(
            world is not None,
            "a sweep on a model needs reference samples (--reference file.npz with 'samples'), "
            "except on a digits model (images [1, 8, 8])",
        )
        reference = world.sample(n, 0.0, torch.Generator().manual_seed(sweep.ref_seed)).float()
    shape = (world.dim,) if world is not None else probe.shape
    check(
        tuple(reference.shape[1:]) == tuple(shape) if reference is not None else True,
        f"reference samples have shape {list(reference.shape[1:]) if reference is not None else ''}, "
        f"the sampled ones {list(shape)}",
    )
    ref = reference.double().reshape(len(reference), -1) if digits is None else None
    cells = []
    for method, weights in sweep.methods.items():
        for w in weights if method != "none" else [1.0]:  # no guidance: one cell, whatever the weights
            for iv in sweep.intervals if method != "none" else (None,):
                cells.append((method, w if isinstance(w, str) else float(w), iv))
    for method in sweep.methods:  # every cell checked before the first write
        for iv in sweep.intervals if method != "none" else (None,):
            for w in sweep.methods[method] if method != "none" else [1.0]:
                replace(base, guider=method, w=w if isinstance(w, str) else float(w)).validate()  # schedules parse
            w = next(iter(sweep.methods[method]), 1.0) if method != "none" else 1.0
            cell = replace(
                base,
                guider=method,
                w=w if isinstance(w, str) else float(w),
                interval=tuple(iv) if iv else None,
                guide=sweep.guides.get(method, base.guide),
                guider_options=sweep.options_for(method),
            )
            jobs.build(cell).probe() if cell.world is not None else cell.validate()  # the exact world: cheap
    check(
        isinstance(sweep.seed_start, int) and 0 <= sweep.seed_start and sweep.seed_start + n <= 2**63,
        f"seeds must be integers in [0, 2^63): seed_start={sweep.seed_start!r}, n={n}",
    )
    out.mkdir(parents=True, exist_ok=True)
    ref_radii = metrics.knn_radii_multi(ref, (3, 5)) if ref is not None else None  # once per reference set
    rows, described_cells = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        release()  # held phase lines first, then the bar
        bar = tqdm(total=n * len(cells), desc=f"sweep ({len(cells)} cells)", unit="sample", bar_format=jobs.shards.BAR)
    try:
        for method, w, iv in cells:
            cfg = replace(
                base,
                guider=method,
                w=w,
                interval=tuple(iv) if iv else None,
                guide=sweep.guides.get(method, base.guide),
                guider_options=sweep.options_for(method),
            )
            name = cell_name(method, w, iv)
            if bar is not None:
                bar.set_postfix_str(name)
            jobs.sample(
                out / "samples" / name,
                cfg,
                n=n,
                seed_start=sweep.seed_start,
                shard_size=sweep.shard_size,
                device=device,
                progress=bar if bar is not None else False,
            )
            d = jobs.load_shards(out / "samples" / name)
            x, seeds = d["samples"], d["seeds"]
            if digits is not None:
                target = d["labels"] if (not cfg.unconditional or method == "classifier") else None
                m = {k: v for k, v in digits(x, target).items() if k != "class_histogram"}
                described = features.describe(digits.extractor, len(x), seeds)
            else:
                m = measure(torch.from_numpy(x.reshape(len(x), -1)).double(), ref, world, ref_radii)
                described = features.describe(features.raw(), len(x), seeds)
            row = {
                "cell": name,
                "method": method,
                "w": weight_number(w),
                "weight": weight_text(w),
                "interval": f"{iv[0]:g}-{iv[1]:g}" if iv else "",
                **m,
                **nfe_of(d["rows"], len(x)),
                "sampling_seconds": d["seconds"],
                **described,
            }
            rows.append(row)
            described_cells.append(json.loads((out / "samples" / name / "job.json").read_text()).get("provenance") or {})
    finally:
        if bar is not None:
            bar.close()
    best = {m: r["cell"] for m, r in best_per_method(rows, metric).items()}
    pareto = [rows[i]["cell"] for i in pareto_front(rows, quality, diversity)]
    reference_info = (
        {"n": len(ref), "seed": sweep.ref_seed if world is not None else None}
        if digits is None
        else {**digits.floor, "classifier": digits.classifier_path}
    )
    first = described_cells[0] if described_cells else {}
    result = {
        "metric": metric,
        "quality": quality,
        "diversity": diversity,
        "best": best,
        "pareto": pareto,
        "reference": reference_info,
        "rows": rows,
        "provenance": provenance.collect(
            device=first.get("device", device or "cpu"),
            **provenance.files(model=base.model),
            **{k: first[k] for k in ("world", "sampler", "steps", "schedule", "dtype", "label") if k in first},
            seeds=first.get("seeds"),
            guider=",".join(dict.fromkeys(m for m, _, _ in cells)),
            weight=",".join(dict.fromkeys(weight_text(w) for _, w, _ in cells)),
            intervals=",".join(f"{iv[0]:g}-{iv[1]:g}" for iv in sweep.intervals if iv) or None,
            **provenance.files(**{f"guide_{m}": sweep.guides.get(m, base.guide) for m in dict.fromkeys(m for m, _, _ in cells)}),
            guider_options=json.dumps(dict(sweep.options))
            if isinstance(sweep.options, Mapping)
            else ",".join(sweep.options) or None,
            metrics_reference=json.dumps(reference_info, default=str),
        ),
    }
    atomic_write(out / "results.json", json.dumps(result, indent=1).encode())
    keys = list(rows[0])
    lines = [",".join(keys)] + [",".join(_csv(r[k]) for k in keys) for r in rows]
    atomic_write(out / "results.csv", ("\n".join(lines) + "\n").encode())
    return result


def _csv(v) -> str:
    s = f"{v:.6g}" if isinstance(v, float) else str(v if v is not None else "")
    return f'"{s}"' if "," in s else s


def read_rows(out: str | os.PathLike) -> list[dict]:
    """Rows of ``out/results.csv`` as dicts of strings (for tools that do not read JSON)."""
    with open(Path(out) / "results.csv", newline="") as f:
        return list(csv.DictReader(f))
