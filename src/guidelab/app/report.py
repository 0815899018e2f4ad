"""Static HTML reports: the sweep report (:func:`render`) and the demo report (:func:`demo_page`).

A sweep report holds the trade-off plots (weight labels placed where they overlap nothing), sample
grids per method and weight, a side-by-side comparison of the methods at matched quality, the results
table (best rows highlighted, with a legend) and the provenance of the run (the ``provenance`` key of
results.json; "not recorded" for an older file). Sample grids: a scatter of 2-D points; for images,
one row per class (the first 10 samples of each label by seed; unlabelled: the first 100), as
:func:`guidelab._io.class_grid` draws them.

Every number of a metric goes through one formatter (:func:`fmt`), so a metric reads the same in the
table, the summary, the captions and the plot labels. Every interpolated field is HTML-escaped. Every
figure is an inline base64 PNG, so ``report.html`` opens from disk with no server and no other file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write, class_grid, png_bytes
from ..errors import GuidelabError, check
from .sweep import HIGHER_IS_BETTER

e = html.escape

#: One number format per field: the table, the summary, the captions and the plot labels all use it.
FORMATS = {
    "mean_logp": ".3f",
    "precision": ".3f",
    "recall": ".3f",
    "density": ".3f",
    "coverage": ".3f",
    "class_accuracy": ".3f",
    "fd": ".3f",
    "kid": ".5f",
    "sliced_wasserstein": ".4f",
    "sampling_seconds": ".1f",
    "seconds": ".1f",
    "nfe": ".4g",
    "nfe_per_sample": ".4g",
    "classifier_evals": ".4g",
    "w": "g",
}
LABEL_FONTSIZE = 9  # weight labels on the trade-off plots (points)

# A pale fill for the best rows; the same colour in the legend swatch.
BEST_COLOUR = "#dff5df"

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
.scroll{overflow-x:auto}
tr.best{background:%(best)s} tr.ref td{color:#666;font-style:italic}
.swatch{display:inline-block;width:1.2em;height:0.9em;background:%(best)s;border:1px solid #9c9;vertical-align:middle}
.legend{font-size:13px;margin:0.4em 0 1em 0} .legend span{margin-right:1.5em}
.row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start} img{border:1px solid #eee;max-width:100%%}
figure{margin:0;font-size:12px;text-align:center}
table.provenance{font-size:12px} table.provenance th{text-align:left;background:#f6f6f6}
table.provenance td{text-align:left;white-space:normal;word-break:break-all;max-width:900px}
p.missing{color:#8a5300} li.ok b{color:#1a7f37} li.no b{color:#b42318}""" % {"best": BEST_COLOUR}

# For headless checks, after load: how many images decoded (body data-images-loaded="k/n") and the laid-out
# size of the images and the provenance block (data-layout: JSON {"images": [[w, h], ...], "provenance": [w, h]}).
_LOADED_JS = """<script>window.addEventListener("load", () => { const im = [...document.images];
document.body.dataset.imagesLoaded = im.filter(i => i.complete && i.naturalWidth > 0).length + "/" + im.length;
const size = el => { if (!el) return null; const r = el.getBoundingClientRect(); return [r.width, r.height]; };
document.body.dataset.layout = JSON.stringify({images: im.map(size), provenance: size(document.getElementById("provenance"))});
});</script>"""


def fmt(key: str, v: Any) -> str:
    """``v`` as text with the one format of field ``key`` (floats; ints plain; anything else ``str``)."""
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return format(v, FORMATS.get(key, ".4g"))


def _mpl(s: Any) -> str:
    """Text for matplotlib: ``$`` would start mathtext."""
    return str(s).replace("$", r"\$")


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _overlaps(a, b, pad: float = 1.0) -> bool:
    return a[0] < b[2] + pad and b[0] < a[2] + pad and a[1] < b[3] + pad and b[1] < a[3] + pad


def place_labels(ax, xy, texts, *, colors=None, fontsize: float = LABEL_FONTSIZE, marker_radius: float = 4.0) -> list:
    """Annotate point ``xy[i]`` (data coordinates) with ``texts[i]``, each label at the first free spot.

    Candidate spots ring the point (8 directions, growing distance, in display pixels); a spot is
    free when its box overlaps no label placed before, no marker (``marker_radius`` points around every
    point of ``xy``) and stays inside the axes. A label set away from its point gets a thin leader line;
    ``colors[i]``: the label's colour (its line's, say). Call after everything is plotted (axis limits
    fixed). Returns the annotations."""
    fig = ax.figure
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    if not len(xy):
        return []
    ax.autoscale_view()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = ax.transData.transform(xy)
    scale = fig.dpi / 72.0
    r = marker_radius * scale
    taken = [(x - r, y - r, x + r, y + r) for x, y in px]
    frame = ax.get_window_extent(renderer)
    dirs = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (0, 1), (-1, 0), (0, -1)]
    out = []
    colors = list(colors) if colors is not None else ["black"] * len(xy)
    for (x, y), (dx_, dy_), s, color in zip(px, xy, texts, colors):
        probe = ax.text(0, 0, s, fontsize=fontsize)
        bb = probe.get_window_extent(renderer)
        probe.remove()
        w, h = bb.width, bb.height
        choice = None
        for dist in (4, 8, 14, 22, 32, 44, 58, 76):
            for cx, cy in dirs:
                d = dist * scale / math.hypot(cx, cy)
                x0 = x + cx * d - (w if cx < 0 else w / 2 if cx == 0 else 0)
                y0 = y + cy * d - (h if cy < 0 else h / 2 if cy == 0 else 0)
                box = (x0, y0, x0 + w, y0 + h)
                inside = frame.x0 <= x0 and x0 + w <= frame.x1 and frame.y0 <= y0 and y0 + h <= frame.y1
                if inside and not any(_overlaps(box, t) for t in taken):
                    choice = (box, dist)
                    break
            if choice:
                break
        if choice is None:  # nowhere free inside the axes: the farthest upper-right spot
            d = 76 * scale / math.sqrt(2)
            choice = ((x + d, y + d, x + d + w, y + d + h), 76)
        box, dist = choice
        taken.append(box)
        out.append(
            ax.annotate(
                s,
                (dx_, dy_),
                xytext=((box[0] - x) / scale, (box[1] - y) / scale),
                textcoords="offset points",
                ha="left",
                va="bottom",
                fontsize=fontsize,
                color=color,
                arrowprops=dict(arrowstyle="-", lw=0.5, color="0.55", shrinkA=0, shrinkB=2) if dist > 8 else None,
            )
        )
    return out


def _weight(r: dict) -> str:
    """A row's weight as text: its schedule text (``weight``, e.g. ``linear:1-4``) where the sweep recorded one."""
    text = r.get("weight")
    return text if isinstance(text, str) and text else fmt("w", r["w"])


def _wkey(w) -> tuple:
    """Sort key for a weight that is a number or a weight-schedule text."""
    return (0, float(w), "") if isinstance(w, (int, float)) else (1, 0.0, str(w))


def _tradeoff(rows, pareto, quality, diversity) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.8))
    colour = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: (str(r["interval"]), _wkey(r["w"])))
        (line,) = ax.plot([r[diversity] for r in rs], [r[quality] for r in rs], "o-", label=_mpl(method))
        colour[method] = line.get_color()
    front = sorted((r for r in rows if r["cell"] in pareto), key=lambda r: r[diversity])
    ax.plot([r[diversity] for r in front], [r[quality] for r in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel(f"{diversity} ({'higher' if HIGHER_IS_BETTER[diversity] else 'lower'} is better)")
    ax.set_ylabel(f"{quality} ({'higher' if HIGHER_IS_BETTER[quality] else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    ax.margins(0.12)
    labelled = [r for r in rows if r["method"] != "none"]
    place_labels(
        ax,
        [(r[diversity], r[quality]) for r in labelled],
        [_mpl("w=" + _weight(r)) for r in labelled],
        colors=[colour[r["method"]] for r in labelled],
    )
    return _png(fig)


def _metric_vs_weight(rows, metric) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.8))
    for key in dict.fromkeys((r["method"], r["interval"]) for r in rows):
        rs = sorted(
            (r for r in rows if (r["method"], r["interval"]) == key and isinstance(r["w"], (int, float))), key=lambda r: r["w"]
        )
        label = _mpl(str(key[0]) + (f" [{key[1]}]" if key[1] else ""))
        ax.plot([r["w"] for r in rs], [r[metric] for r in rs], "o-", label=label)
    ax.set_xlabel("guidance weight w (1 = none)")
    ax.set_ylabel(f"{metric} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
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
    ax.set_title(_mpl(title), fontsize=8)
    return _png(fig)


def _describe(ref) -> str:
    """A results record as readable text: ``key: value; ...`` (floats with the field's format)."""
    if not isinstance(ref, dict):
        return str(ref)
    return "; ".join(f"{k}: {fmt(str(k), v)}" for k, v in ref.items())


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


def provenance_block(prov: Any) -> str:
    """The provenance as a two-column table (every key and value escaped), or "not recorded"."""
    head = "<h2 id='provenance-title'>Provenance</h2>"
    if not isinstance(prov, dict) or not prov:
        return (
            head + "<p class='missing' id='provenance'>Provenance: <b>not recorded</b> (written by a guidelab without "
            "provenance; rerun the command to record version, command line, model hashes and settings).</p>"
        )
    body = "".join(f"<tr><th scope='row'>{e(str(k))}</th><td>{e(_text(v))}</td></tr>" for k, v in prov.items())
    return head + f"<table class='provenance' id='provenance'>{body}</table>"


def _legend(metric: str, *, front: bool = True) -> str:
    better = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
    s = (
        f"<div class='legend'><span><span class='swatch'></span> best weight of its method by <b>{e(metric)}</b> "
        f"({better} is better)</span>"
    )
    if front:
        s += "<span>&#9670; on the Pareto front (no other cell is better in both quality and diversity)</span>"
    return s + "</div>"


def _results(path: Path) -> dict:
    """A sweep's results.json, checked: an object with rows (each with a cell, method, w, interval and
    numeric metric, quality and diversity), known metric / quality / diversity, best, pareto."""
    try:
        res = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise GuidelabError(f"{path} is not JSON ({err}); rerun `guidelab sweep`") from None
    keys = ("rows", "metric", "quality", "diversity", "best", "pareto")
    check(
        isinstance(res, dict) and all(k in res for k in keys),
        f"{path} is not a sweep's results.json (needs the keys {', '.join(keys)}); rerun `guidelab sweep`",
    )
    check(
        isinstance(res["rows"], list) and bool(res["rows"]) and all(isinstance(r, dict) and "cell" in r for r in res["rows"]),
        f"{path} has no rows of cells; rerun `guidelab sweep`",
    )
    bad = [r["cell"] for r in res["rows"] if not (isinstance(r["cell"], str) and re.fullmatch(r"[\w+\-][\w.+=\-]*", r["cell"]))]
    check(not bad, f"{path}: cell {bad[0] if bad else ''!r} is not a folder name of samples/ (letters, digits, . _ + -)")
    for k in ("metric", "quality", "diversity"):
        check(
            isinstance(res[k], str) and res[k] in HIGHER_IS_BETTER,
            f"{path}: {k} {str(res[k])[:40]!r} is not a metric; allowed: {', '.join(HIGHER_IS_BETTER)}",
        )
    check(isinstance(res["best"], dict), f"{path}: best must map methods to cells")
    check(isinstance(res["pareto"], list), f"{path}: pareto must be a list of cells")
    for r in res["rows"]:
        for k in ("method", "w", "interval"):
            check(k in r, f"{path}: row {r['cell']} has no {k!r}; rerun `guidelab sweep`")
        for k in dict.fromkeys((res["metric"], res["quality"], res["diversity"])):
            v = r.get(k)
            check(
                isinstance(v, (int, float)) and not isinstance(v, bool),
                f"{path}: row {r['cell']} has no number for {k!r} (got {str(v)[:40]!r}); rerun `guidelab sweep`",
            )
    return res


def matched_quality(rows: list[dict], quality: str) -> tuple[float, list[dict]] | None:
    """One cell per guided method at (nearly) the same quality, for a side-by-side look at what each
    method keeps of diversity there. Target: the best quality every guided method reaches (the worst of
    the methods' best values); each method's cell is the one whose quality is closest to it. Cells at
    w = 1 (no guidance) are left out where a method has others. ``None`` with fewer than two guided methods."""
    sign = 1.0 if HIGHER_IS_BETTER[quality] else -1.0
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "none"]
    if len(methods) < 2:
        return None
    guided = {m: [r for r in rows if r["method"] == m and r["w"] != 1] or [r for r in rows if r["method"] == m] for m in methods}
    reach = [max(sign * r[quality] for r in guided[m]) for m in methods]
    target = sign * min(reach)
    picks = [min(guided[m], key=lambda r: abs(r[quality] - target)) for m in methods]
    return target, picks


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
    best_cells = {str(c) for c in res["best"].values()}
    pareto = [str(c) for c in res["pareto"]]

    def caption(r: dict) -> str:
        return f"{e(r['cell'])}<br>{e(quality)} {e(fmt(quality, r[quality]))}, {e(diversity)} {e(fmt(diversity, r[diversity]))}"

    def figure(r: dict) -> str:
        d = shards[r["cell"]]
        if d["samples"].ndim == 4:
            labels = d["labels"] if r.get("class_accuracy") is not None else None
            src = _image_grid(d["samples"], labels, d["seeds"])
        else:
            src = _grid(samples[r["cell"]], r["cell"], view)
        return f"<figure><img alt='{e(r['cell'])}' src='{src}'><figcaption>{caption(r)}</figcaption></figure>"

    record = ("extractor", "weights_sha256", "resize", "n")  # the same for every cell: shown once
    keys = [k for k in rows[0] if k not in ("seeds", *record)]
    table = "<table id='results'><tr>" + "".join(f"<th>{e(str(k))}</th>" for k in keys) + "</tr>"
    for r in rows:
        cls = ' class="best"' if r["cell"] in best_cells else ""
        cells = []
        for k in keys:
            text = e(fmt(str(k), r.get(k)))
            if k == "cell" and r["cell"] in pareto:
                text = "&#9670; " + text
            cells.append(f"<td>{text}</td>")
        table += f"<tr{cls}>" + "".join(cells) + "</tr>"
    table += "</table>"

    grids = ""
    for method in dict.fromkeys(r["method"] for r in rows):
        grids += f"<h3>{e(str(method))}</h3><div class='row'>"
        grids += "".join(figure(r) for r in rows if r["method"] == method) + "</div>"

    match = matched_quality(rows, quality)
    if match is not None:
        target, picks = match
        base = [r for r in rows if r["method"] == "none"][:1]
        compare = (
            f"<h2>At matched quality</h2><p>One cell per method at {e(quality)} &asymp; {e(fmt(quality, target))} (the best "
            f"{e(quality)} every method reaches; each method's closest cell), so the grids differ in what guidance keeps "
            f"of {e(diversity)}{' (no guidance for reference)' if base else ''}.</p>"
            f"<div class='row' id='matched'>{''.join(figure(r) for r in base + picks)}</div>"
        )
    else:
        compare = "<h2>At matched quality</h2><p>Needs at least two guided methods in the sweep.</p>"

    best_text = ", ".join(f"{m}: {c}" for m, c in res["best"].items())
    ref0 = rows[0]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>guidelab sweep report</title>
<style>{_CSS}</style></head>
<body><h1>guidelab sweep</h1>
<p>Best weight per method by <b>{e(metric)}</b> ({"higher" if HIGHER_IS_BETTER[metric] else "lower"} is better):
{e(best_text)}.
Pareto front of {e(quality)} against {e(diversity)}: {e(", ".join(pareto))}.</p>
<h2>Trade-offs</h2><div class="row"><img alt="tradeoff" src="{_tradeoff(rows, pareto, quality, diversity)}">
<img alt="metric vs weight" src="{_metric_vs_weight(rows, metric)}"></div>
{compare}
<h2>Samples</h2><div id='samples'>{grids}</div>
<h2>Results</h2>{_legend(metric)}<div class='scroll'>{table}</div>
<p>Reference: {e(_describe(res.get("reference")))}. Features: {e(str(ref0.get("extractor", "")))}
(weights sha256 {e(str(ref0.get("weights_sha256")))}, resize {e(str(ref0.get("resize")))});
sample count {e(str(ref0.get("n")))} per cell, seeds {e(str(ref0.get("seeds")))}.</p>
{provenance_block(res.get("provenance"))}
{_LOADED_JS}
</body></html>
"""
    path = Path(out) if out is not None else sweep_dir / "report.html"
    atomic_write(path, page.encode())
    return path


# ---------------------------------------------------------------------------------------------
# The demo report (guidelab.app.demo): the same formats, legend, label placement and provenance block.

DEMO_COLUMNS = (
    ("method", "method"),
    ("w", "w"),
    ("mean_logp", "mean log p"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("sliced_wasserstein", "sliced W2"),
    ("nfe_per_sample", "NFE"),
)


def demo_tradeoff_figure(records, baseline: dict):
    """Quality (mean exact log p; precision) against recall per method, weight labels placed free."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    styles = {"none": ("k", "o"), "cfg": ("tab:red", "s"), "autoguidance": ("tab:green", "^")}
    colour: dict[str, str] = {}
    for ax, quality in zip(axes, ("mean_logp", "precision")):
        for method, (color, marker) in styles.items():
            rs = [r for r in records if r.method == method]
            colour[method] = color
            ax.plot(
                [r.recall for r in rs],
                [getattr(r, quality) for r in rs],
                marker=marker,
                color=color,
                label=method,
                linestyle="-" if len(rs) > 1 else "none",
            )
        ax.axhline(baseline[quality], color="0.5", linestyle=":", label="exact samples")
        ax.set_xlabel("recall (variation)")
        ax.set_ylabel({"mean_logp": "mean exact log p (quality)", "precision": "precision (quality)"}[quality])
        ax.grid(alpha=0.3)
        ax.margins(0.12)
        labelled = [r for r in records if r.method != "none"]
        place_labels(
            ax,
            [(r.recall, getattr(r, quality)) for r in labelled],
            ["w=" + fmt("w", r.w) for r in labelled],
            colors=[colour.get(r.method, "black") for r in labelled],
        )
    axes[0].legend(fontsize=9)
    fig.tight_layout()
    return fig


def demo_page(
    records,
    samples,
    exact,
    baseline,
    findings,
    nets,
    *,
    n: int,
    seconds: float,
    scatter,
    models: dict,
    grid: tuple[int, float, float, float],
    provenance=None,
) -> tuple[str, dict]:
    """The demo's HTML report (images inlined) and its figures as PNG bytes by name (what :func:`guidelab.app.demo.run`
    writes): ``scatter(panels)`` draws the sample panels, ``models`` is the demo's model table, ``grid`` its Heun
    grid ``(steps, sigma_min, sigma_max, rho)``, ``provenance`` a flat dict (None: "not recorded")."""
    steps, sigma_min, sigma_max, rho = grid

    def png(fig) -> bytes:
        return base64.b64decode(_png(fig).split(",", 1)[1])

    best = {
        m: max((r for r in records if r.method == m), key=lambda r: r.mean_logp, default=None) for m in ("cfg", "autoguidance")
    }
    ag = best["autoguidance"]
    cfg_match = (
        min((r for r in records if r.method == "cfg"), key=lambda r: abs(r.mean_logp - ag.mean_logp), default=None)
        if ag
        else None
    )
    panels = [("exact class A", exact), ("no guidance", samples[("none", 1.0)])]
    if cfg_match:
        title = f"CFG w={fmt('w', cfg_match.w)}, log p {fmt('mean_logp', cfg_match.mean_logp)}"
        panels.append((title, samples[("cfg", cfg_match.w)]))
    if ag:
        title = f"autoguidance w={fmt('w', ag.w)}, log p {fmt('mean_logp', ag.mean_logp)}"
        panels.append((title, samples[("autoguidance", ag.w)]))
    figures = {
        "samples.png": png(scatter(panels)),
        "tradeoff.png": png(demo_tradeoff_figure(records, baseline)),
        "all_samples.png": png(scatter([(f"{k[0]} w={fmt('w', k[1])}", v) for k, v in samples.items()])),
    }
    main_fig, trade, all_fig = (base64.b64encode(figures[k]).decode() for k in ("samples.png", "tradeoff.png", "all_samples.png"))
    best_ids = {id(r) for r in best.values() if r is not None}
    head = "".join(f"<th>{e(t)}</th>" for _, t in DEMO_COLUMNS)
    rows = "".join(
        f"<tr{' class=best' if id(r) in best_ids else ''}>"
        + "".join(f"<td>{e(fmt(k, getattr(r, k)))}</td>" for k, _ in DEMO_COLUMNS)
        + "</tr>"
        for r in records
    )
    rows += (
        "<tr class='ref'><td>exact samples</td><td></td>"
        + "".join(f"<td>{e(fmt(k, baseline[k]))}</td>" for k, _ in DEMO_COLUMNS[2:6])
        + "<td></td></tr>"
    )
    claims = "".join(
        f"<li class='{'ok' if ok else 'no'}'><b>{'holds' if ok else 'does NOT hold'}</b>: {e(str(c))} &mdash; {e(str(ev))}</li>"
        for c, ok, ev in findings
    )
    params = {k: sum(p.numel() for p in v.parameters()) for k, v in nets.items()}
    setup = "".join(
        f"<li><b>{e(str(k))}</b>: classes {e(str(v['classes']))}, width {e(str(v['hidden']))}, {e(str(v['iters']))} "
        f"iterations, {params.get(k, 0):,} parameters</li>"
        for k, v in models.items()
    )
    matched = (
        f"CFG at w = {e(fmt('w', cfg_match.w))} is the CFG weight whose mean log p "
        f"({e(fmt('mean_logp', cfg_match.mean_logp))}) is closest to autoguidance's best "
        f"({e(fmt('mean_logp', ag.mean_logp))} at w = {e(fmt('w', ag.w))}): the two right panels compare the methods at "
        "matched quality."
        if cfg_match and ag
        else ""
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>guidelab demo: autoguidance vs CFG</title>
<style>{_CSS}</style>
</head><body>
<h1>Autoguidance vs classifier-free guidance on the exact 2-D tree</h1>
<p>Reproduces the toy experiment of Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
Itself": class A of the fractal tree (orange outline; grey: both classes). Models (exact-score matching
on the exact noisy distribution):</p><ul>{setup}</ul>
<p>Sampler: EDM Heun, {int(steps)} steps, sigma in [{sigma_min:g}, {sigma_max:g}], rho {rho:g}, started
from exact class-A points at sigma_max; {int(n)} samples per row. Guidance <code>D = D_ref + w (D_main - D_ref)</code>
(w = 1: none); CFG's reference is the unconditional (AB) model, autoguidance's the small, short-trained class-A model.
Metrics against {int(n)} exact class-A samples: mean exact log-density (quality), k-NN precision and recall
(k = 3), sliced Wasserstein distance. Total time {seconds:.0f} s.</p>
<h2>What the measurements say</h2><ul>{claims}</ul>
<p>{matched}</p>
<img src="data:image/png;base64,{main_fig}" alt="samples">
<h2>Quality vs variation across weights</h2>
<img src="data:image/png;base64,{trade}" alt="trade-off">
<h2>Metrics</h2>{_legend("mean_logp", front=False)}
<table><tr>{head}</tr>
{rows}</table>
<h2>All samples</h2>
<img src="data:image/png;base64,{all_fig}" alt="all samples">
{provenance_block(provenance)}
{_LOADED_JS}
</body></html>
"""
    return page, figures
