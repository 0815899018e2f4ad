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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .. import metrics, toy
from .._io import atomic_write
from ..errors import check
from ..guidance import registry
from ..metrics import features
from . import jobs
from .evaluate import DigitsMetrics, nfe_of

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


def cell_name(method: str, w: float, interval) -> str:
    name = f"{method}_w{w:g}"
    return name + (f"_i{interval[0]:g}-{interval[1]:g}" if interval else "")


def measure(x: torch.Tensor, ref: torch.Tensor, world=None) -> dict:
    """All point-cloud metrics of samples ``x`` [N, D] against ``ref`` [M, D] (raw coordinates)."""
    p, r = metrics.precision_recall(ref, x, k=3)
    d, c = metrics.density_coverage(ref, x, k=5)
    fs_x, fs_r = metrics.FeatureStats(x.shape[1]).update(x), metrics.FeatureStats(ref.shape[1]).update(ref)
    row = {
        "precision": p,
        "recall": r,
        "density": d,
        "coverage": c,
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
    keywords (``["k=v", ...]`` or a dict), each given to the methods that take it; ``metric`` chooses the
    best weight per method, ``quality`` / ``diversity`` are the Pareto axes; ``ref_seed``: the exact
    world's reference draw; ``classifier``: the clean digits classifier of the digits metrics (default: the
    cached one)."""

    methods: Mapping[str, Sequence[float]]
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


def run(out: str | os.PathLike, base: jobs.SampleConfig, sweep: SweepConfig, *, reference: torch.Tensor | None = None) -> dict:
    """Sample and measure every (method, weight, interval) cell of ``sweep`` on ``base``; returns and writes
    the results. Reference: ``reference`` or, on an exact world, ``n`` exact samples drawn with
    ``ref_seed``; a digits model without ``reference`` uses the digits metrics. A class-conditional model
    with ``base.label`` None samples balanced labels.
    """
    sweep.validate()
    n, metric, quality, diversity = sweep.n, sweep.metric, sweep.quality, sweep.diversity
    out = Path(out)
    world = toy.tree(base.world, dtype=torch.float64) if base.world is not None else None
    digits = None
    if base.model is not None:
        probe = jobs.build_balanced(base, classifier="classifier" in sweep.methods)
        base = probe.cfg
        if reference is None and probe.shape == (1, 8, 8):
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
    for method in sweep.methods:  # every cell checked before the first write
        for iv in sweep.intervals if method != "none" else (None,):
            w = float(next(iter(sweep.methods[method]), 1.0)) if method != "none" else 1.0
            cell = replace(
                base,
                guider=method,
                w=w,
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
    rows = []
    for method, weights in sweep.methods.items():
        for w in weights if method != "none" else [1.0]:  # no guidance: one cell, whatever the weights
            for iv in sweep.intervals if method != "none" else (None,):
                cfg = replace(
                    base,
                    guider=method,
                    w=float(w),
                    interval=tuple(iv) if iv else None,
                    guide=sweep.guides.get(method, base.guide),
                    guider_options=sweep.options_for(method),
                )
                name = cell_name(method, w, iv)
                jobs.sample(out / "samples" / name, cfg, n=n, seed_start=sweep.seed_start, shard_size=sweep.shard_size)
                d = jobs.load_shards(out / "samples" / name)
                x, seeds = d["samples"], d["seeds"]
                if digits is not None:
                    target = d["labels"] if (not cfg.unconditional or method == "classifier") else None
                    m = {k: v for k, v in digits(x, target).items() if k != "class_histogram"}
                    described = features.describe(digits.extractor, len(x), seeds)
                else:
                    m = measure(torch.from_numpy(x.reshape(len(x), -1)).double(), ref, world)
                    described = features.describe(features.raw(), len(x), seeds)
                row = {
                    "cell": name,
                    "method": method,
                    "w": float(w),
                    "interval": f"{iv[0]:g}-{iv[1]:g}" if iv else "",
                    **m,
                    **nfe_of(d["rows"], len(x)),
                    "sampling_seconds": d["seconds"],
                    **described,
                }
                rows.append(row)
    best = {m: r["cell"] for m, r in best_per_method(rows, metric).items()}
    pareto = [rows[i]["cell"] for i in pareto_front(rows, quality, diversity)]
    reference_info = (
        {"n": len(ref), "seed": sweep.ref_seed if world is not None else None}
        if digits is None
        else {**digits.floor, "classifier": digits.classifier_path}
    )
    result = {
        "metric": metric,
        "quality": quality,
        "diversity": diversity,
        "best": best,
        "pareto": pareto,
        "reference": reference_info,
        "rows": rows,
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
