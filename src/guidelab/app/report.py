"""A static HTML report of a sweep: trade-off plots, sample grids per method and weight, the table.

Sample grids: a scatter of 2-D points; for images, one row per class (the first 10 samples of each
label by seed; unlabelled: the first 100), as :func:`guidelab._io.class_grid` draws them.

Every figure is an inline base64 PNG, so ``report.html`` opens from disk with no server and no
other file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from pathlib import Path

import numpy as np

from .._io import atomic_write, class_grid, png_bytes
from ..errors import GuidelabError, check
from .sweep import HIGHER_IS_BETTER


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _tradeoff(rows, pareto, quality, diversity) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: (r["interval"], r["w"]))
        ax.plot([r[diversity] for r in rs], [r[quality] for r in rs], "o-", label=method)
        for r in rs:
            ax.annotate(f"{r['w']:g}", (r[diversity], r[quality]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in rows if r["cell"] in pareto), key=lambda r: r[diversity])
    ax.plot([r[diversity] for r in front], [r[quality] for r in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel(f"{diversity} ({'higher' if HIGHER_IS_BETTER[diversity] else 'lower'} is better)")
    ax.set_ylabel(f"{quality} ({'higher' if HIGHER_IS_BETTER[quality] else 'lower'} is better)")
    ax.legend(fontsize=8)
    return _png(fig)


def _metric_vs_weight(rows, metric) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for key in dict.fromkeys((r["method"], r["interval"]) for r in rows):
        rs = sorted((r for r in rows if (r["method"], r["interval"]) == key), key=lambda r: r["w"])
        ax.plot([r["w"] for r in rs], [r[metric] for r in rs], "o-", label=key[0] + (f" [{key[1]}]" if key[1] else ""))
    ax.set_xlabel("guidance weight w (1 = none)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    return _png(fig)


def _image_grid(x: np.ndarray, labels, seeds) -> str:
    """Images [N, C, H, W] in [-1, 1]: a class grid (rows = labels) as an inline PNG, not resampled."""
    g = class_grid(x, labels, seeds, scale=max(1, 24 // x.shape[-1]))
    return "data:image/png;base64," + base64.b64encode(png_bytes(g)).decode()


def _grid(x: np.ndarray, title: str, view=None) -> str:
    """2-D points: a scatter; other shapes: the first two coordinates as lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.4, 2.4))
    if x.ndim == 2 and x.shape[1] == 2:
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5, lw=0)
        if view is not None:
            ax.set_xlim(view[0], view[1])
            ax.set_ylim(view[2], view[3])
        ax.set_aspect("equal")
    else:
        ax.plot(x.reshape(len(x), -1)[:, :2].T if x.ndim > 1 else x, lw=0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    return _png(fig)


def _describe(ref) -> str:
    """A results record as readable text: ``key: value; ...`` with floats to 4 significant digits."""
    if not isinstance(ref, dict):
        return str(ref)
    return "; ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in ref.items())


def _results(path: Path) -> dict:
    """A sweep's results.json, checked: an object with rows (each with a cell), metric, quality, diversity, best, pareto."""
    try:
        res = json.loads(path.read_text())
    except ValueError as e:
        raise GuidelabError(f"{path} is not JSON ({e}); rerun `guidelab sweep`") from None
    keys = ("rows", "metric", "quality", "diversity", "best", "pareto")
    check(
        isinstance(res, dict) and all(k in res for k in keys),
        f"{path} is not a sweep's results.json (needs the keys {', '.join(keys)}); rerun `guidelab sweep`",
    )
    check(
        isinstance(res["rows"], list) and bool(res["rows"]) and all(isinstance(r, dict) and "cell" in r for r in res["rows"]),
        f"{path} has no rows of cells; rerun `guidelab sweep`",
    )
    bad = [r["cell"] for r in res["rows"] if not (isinstance(r["cell"], str) and re.fullmatch(r"[\w+\-][\w.+\-]*", r["cell"]))]
    check(not bad, f"{path}: cell {bad[0] if bad else ''!r} is not a folder name of samples/ (letters, digits, . _ + -)")
    return res


def render(sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, grid_samples: int = 2000) -> Path:
    """Write ``<sweep_dir>/report.html`` (or ``out``) from a sweep's results.json and samples."""
    from .jobs import load_shards

    sweep_dir = Path(sweep_dir)
    check((sweep_dir / "results.json").is_file(), f"{sweep_dir} has no results.json; run `guidelab sweep` first")
    res = _results(sweep_dir / "results.json")
    rows, metric, quality, diversity = res["rows"], res["metric"], res["quality"], res["diversity"]
    shards = {r["cell"]: load_shards(sweep_dir / "samples" / r["cell"]) for r in rows}
    samples = {c: d["samples"][:grid_samples] for c, d in shards.items()}
    view = None
    if all(x.ndim == 2 and x.shape[1] == 2 for x in samples.values()):
        allx = np.concatenate(list(samples.values()))
        lo, hi = np.percentile(allx, 0.5, axis=0), np.percentile(allx, 99.5, axis=0)
        view = (lo[0], hi[0], lo[1], hi[1])
    e = html.escape
    record = ("extractor", "weights_sha256", "resize", "n")  # the same for every cell: shown once
    keys = [k for k in rows[0] if k not in ("seeds", *record)]
    table = "<table><tr>" + "".join(f"<th>{e(k)}</th>" for k in keys) + "</tr>"
    for r in rows:
        cls = ' class="best"' if r["cell"] in res["best"].values() else ""
        table += (
            f"<tr{cls}>"
            + "".join(f"<td>{r[k]:.4g}</td>" if isinstance(r[k], float) else f"<td>{e(str(r[k]))}</td>" for k in keys)
            + "</tr>"
        )
    table += "</table>"
    grids = ""
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = [r for r in rows if r["method"] == method]
        grids += f"<h3>{e(method)}</h3><div class='row'>"
        for r in cells:
            d = shards[r["cell"]]
            if d["samples"].ndim == 4:
                labels = d["labels"] if r.get("class_accuracy") is not None else None
                grids += (
                    f"<figure><img alt='{e(r['cell'])}' src='{_image_grid(d['samples'], labels, d['seeds'])}'>"
                    f"<figcaption>{e(r['cell'])}</figcaption></figure>"
                )
            else:
                grids += f"<img alt='{e(r['cell'])}' src='{_grid(samples[r['cell']], r['cell'], view)}'>"
        grids += "</div>"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>guidelab sweep report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} tr.best{{background:#e6ffe6}}
.row{{display:flex;flex-wrap:wrap;gap:4px}} img{{border:1px solid #eee}}
figure{{margin:0;font-size:11px;text-align:center}}</style></head>
<body><h1>guidelab sweep</h1>
<p>Best weight per method by <b>{e(metric)}</b> ({"higher" if HIGHER_IS_BETTER[metric] else "lower"} is better):
{e(", ".join(f"{m}: {c}" for m, c in res["best"].items()))}.
Pareto front of {e(quality)} against {e(diversity)}: {e(", ".join(res["pareto"]))}.</p>
<h2>Trade-offs</h2><div class="row"><img alt="tradeoff" src="{_tradeoff(rows, res["pareto"], quality, diversity)}">
<img alt="metric vs weight" src="{_metric_vs_weight(rows, metric)}"></div>
<h2>Samples</h2>{grids}
<h2>Results</h2>{table}
<p>Reference: {e(_describe(res["reference"]))}. Features: {e(str(rows[0].get("extractor", "")))}
(weights sha256 {e(str(rows[0].get("weights_sha256")))}, resize {e(str(rows[0].get("resize")))});
sample count {e(str(rows[0].get("n")))} per cell, seeds {e(str(rows[0].get("seeds")))}.</p>
<script>/* for headless checks: how many images decoded */
window.addEventListener("load", () => {{ const im = [...document.images];
document.body.dataset.imagesLoaded = im.filter(i => i.complete && i.naturalWidth > 0).length + "/" + im.length; }});</script>
</body></html>
"""
    path = Path(out) if out is not None else sweep_dir / "report.html"
    atomic_write(path, page.encode())
    return path
