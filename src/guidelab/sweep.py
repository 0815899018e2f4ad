"""Sweeps: guidance methods x weights (x intervals) -> a results table, best weight per method, Pareto front.

Every cell is a resumable :func:`guidelab.jobs.sample` job in ``out/samples/<cell>``. Metrics: on
points, against a reference set (exact samples of the world, or given reference samples) on raw
coordinates; on a digits model (images [1, 8, 8]) without a reference, the digits metrics of
:class:`guidelab.evaluate.DigitsMetrics` (class accuracy, FD, precision / recall, density / coverage in
the digits-classifier features, against the test split). Every row records NFE per sample (counted)
and sampling seconds. Writes ``out/results.csv`` and ``out/results.json`` (rows, best, pareto, settings).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from . import jobs, metrics, toy
from ._io import atomic_write
from .errors import check
from .evaluate import DigitsMetrics, nfe_of
from .metrics import features

#: metric -> True when higher is better.
HIGHER_IS_BETTER = {"mean_logp": True, "precision": True, "recall": True, "density": True, "coverage": True,
                    "fd": False, "kid": False, "sliced_wasserstein": False, "class_accuracy": True}


def cell_name(method: str, w: float, interval) -> str:
    name = f"{method}_w{w:g}"
    return name + (f"_i{interval[0]:g}-{interval[1]:g}" if interval else "")


def measure(x: torch.Tensor, ref: torch.Tensor, world=None) -> dict:
    """All point-cloud metrics of samples ``x`` [N, D] against ``ref`` [M, D] (raw coordinates)."""
    p, r = metrics.precision_recall(ref, x, k=3)
    d, c = metrics.density_coverage(ref, x, k=5)
    fs_x, fs_r = metrics.FeatureStats(x.shape[1]).update(x), metrics.FeatureStats(ref.shape[1]).update(ref)
    row = {"precision": p, "recall": r, "density": d, "coverage": c, "fd": metrics.fid_from_stats(fs_r, fs_x),
           "kid": metrics.kid(ref, x, subsets=10, subset_size=min(1000, len(x), len(ref)))[0],
           "sliced_wasserstein": metrics.sliced_wasserstein(ref, x)}
    if world is not None:
        row["mean_logp"] = metrics.mean_logp(world, x)
    return row


def pareto_front(rows: list[dict], quality: str, diversity: str) -> list[int]:
    """Indices of rows not dominated in (quality, diversity), each oriented by HIGHER_IS_BETTER."""
    sq = 1 if HIGHER_IS_BETTER[quality] else -1
    sd = 1 if HIGHER_IS_BETTER[diversity] else -1
    pts = [(sq * r[quality], sd * r[diversity]) for r in rows]
    return [i for i, (q, d) in enumerate(pts)
            if not any(q2 >= q and d2 >= d and (q2 > q or d2 > d) for q2, d2 in pts)]


def best_per_method(rows: list[dict], metric: str) -> dict[str, dict]:
    """The row with the best ``metric`` for each method."""
    s = 1 if HIGHER_IS_BETTER[metric] else -1
    best = {}
    for r in rows:
        if r["method"] not in best or s * r[metric] > s * best[r["method"]][metric]:
            best[r["method"]] = r
    return best


def run(out: str | os.PathLike, base: jobs.SampleConfig, methods: dict[str, list[float]], *, n: int = 2048,
        seed_start: int = 0, intervals=(None,), reference: torch.Tensor | None = None, ref_seed: int = 10**9,
        metric: str = "fd", quality: str = "precision", diversity: str = "recall",
        guides: dict[str, str | None] | None = None, shard_size: int = 1024, classifier=None) -> dict:
    """Sample and measure every (method, weight, interval) cell; returns and writes the results.

    ``methods``: {guider name (:data:`guidelab.jobs.GUIDERS`): [weights]}; ``guides``: checkpoint per
    method (cfg: the unconditional model, classifier: the noise-aware classifier; default
    ``base.guide``). Reference: ``reference`` or, on an exact world, ``n`` exact samples drawn with
    ``ref_seed``; a digits model without ``reference`` uses the digits metrics (``classifier``: the
    clean digits classifier's checkpoint, default the cached one). A class-conditional model with
    ``base.label`` None samples balanced labels.
    """
    for m in (metric, quality, diversity):
        check(m in HIGHER_IS_BETTER, f"unknown metric {m!r}; allowed: {', '.join(HIGHER_IS_BETTER)}")
    check(bool(methods), "give at least one method")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = toy.tree(base.world, dtype=torch.float64) if base.world is not None else None
    digits = None
    if base.model is not None:
        probe = jobs.build_balanced(base, classifier="classifier" in methods)
        base = probe.cfg
        if reference is None and probe.shape == (1, 8, 8):
            digits = DigitsMetrics(classifier)
    if reference is None and digits is None:
        check(world is not None, "a sweep on a model needs reference samples (--reference file.npz with 'samples'), "
              "except on a digits model (images [1, 8, 8])")
        reference = world.sample(n, 0.0, torch.Generator().manual_seed(ref_seed)).float()
    ref = reference.double().reshape(len(reference), -1) if digits is None else None
    guides = guides or {}
    rows = []
    for method, weights in methods.items():
        for w in (weights if method != "none" else [1.0]):     # no guidance: one cell, whatever the weights
            for iv in (intervals if method != "none" else (None,)):
                cfg = replace(base, guider=method, w=float(w), interval=tuple(iv) if iv else None,
                              guide=guides.get(method, base.guide))
                name = cell_name(method, w, iv)
                jobs.sample(out / "samples" / name, cfg, n=n, seed_start=seed_start, shard_size=shard_size)
                d = jobs.load_shards(out / "samples" / name)
                x, seeds = d["samples"], d["seeds"]
                if digits is not None:
                    target = d["labels"] if (not cfg.null_label or method == "classifier") else None
                    m = {k: v for k, v in digits(x, target).items() if k != "class_histogram"}
                    described = features.describe(digits.extractor, len(x), seeds)
                else:
                    m = measure(torch.from_numpy(x.reshape(len(x), -1)).double(), ref, world)
                    described = features.describe(features.raw(), len(x), seeds)
                row = {"cell": name, "method": method, "w": float(w), "interval": f"{iv[0]:g}-{iv[1]:g}" if iv else "",
                       **m, **nfe_of(d["rows"], len(x)), "sampling_seconds": d["seconds"], **described}
                rows.append(row)
    best = {m: r["cell"] for m, r in best_per_method(rows, metric).items()}
    pareto = [rows[i]["cell"] for i in pareto_front(rows, quality, diversity)]
    reference_info = ({"n": len(ref), "seed": ref_seed if world is not None else None} if digits is None
                      else {**digits.floor, "classifier": digits.classifier_path})
    result = {"metric": metric, "quality": quality, "diversity": diversity, "best": best, "pareto": pareto,
              "reference": reference_info, "rows": rows}
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
