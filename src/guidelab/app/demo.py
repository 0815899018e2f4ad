"""The demo: autoguidance vs classifier-free guidance on the exact 2-D tree (Karras et al. 2024, Sec. 3).

Trains (or reuses) the paper's three toy models, samples with no guidance, CFG and autoguidance at
several weights, measures quality (exact mean log-density, precision) and variation (recall), and
writes ``<out>/metrics.json`` and a self-contained ``<out>/report.html``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import guidance, metrics, samplers, schedules, toy
from .._io import atomic_write
from ..errors import GuidelabError
from ..log import get_logger, release
from ..training import load_model, train_toy
from . import provenance

log = get_logger(__name__)

#: The paper's toy setup (methods.md §2.3): models and sampler.
MODELS = {
    "main": dict(classes="A", hidden=64, iters=4096),  # the model being guided
    "guide": dict(classes="A", hidden=32, iters=512),  # autoguidance: smaller, trained 8x shorter
    "uncond": dict(classes="AB", hidden=32, iters=512),  # CFG: unconditional model (both classes)
}
#: ``--quick``: tiny models for a smoke test (seconds, not minutes); too short to show the finding.
QUICK = {k: {"iters": max(v["iters"] // 16, 32), "batch": 1024} for k, v in MODELS.items()}
SIGMA_MIN, SIGMA_MAX, STEPS, RHO = 0.002, 5.0, 32, 7.0
#: Parameters of the largest demo network (ToyMLP, hidden 64; tests/test_demo.py checks it): small, so one
#: CPU thread by default (guidelab.threads; measured in bench/demo_load.py).
PARAMETERS = 16_641
WEIGHTS = {"cfg": (1.5, 2.0, 3.0, 4.0), "autoguidance": (1.5, 2.0, 2.5, 3.0)}
VIEW = (0.30, 0.30, 1.2)  # centre x, centre y, half-width: the paper's wide view


@dataclass
class Record:
    method: str
    w: float
    mean_logp: float
    precision: float
    recall: float
    sliced_wasserstein: float
    nfe_per_sample: int
    seconds: float


class _Counter:
    """Counts network evaluations per sample (for the NFE column)."""

    def __init__(self, net):
        self.net, self.rows = net, 0

    def __call__(self, x, sigma, **cond):
        self.rows += x.shape[0]
        return self.net(x, sigma, **cond)


def _train_side(out: Path, cfgs: dict[str, dict]) -> None:
    for c in cfgs.values():
        train_toy(out / "models", progress=False, **c)


def _side_process(out: Path, cfgs: dict[str, dict]):
    """Train the small models (``cfgs``) in a second process while this one trains the main model, when a core
    is free for it and they are long enough to pay for it (:func:`guidelab.training.prefetch.spare_core_pays`);
    ``None`` otherwise. Each run is the same as in this process (one thread each): only the wall time changes."""
    import torch.multiprocessing as mp

    from ..training.prefetch import spare_core_pays
    from ..training.toy import ToyConfig

    samples = sum(cfg.iters * cfg.batch for cfg in (ToyConfig(**c) for c in cfgs.values()))
    if not spare_core_pays(samples) or "fork" not in mp.get_all_start_methods():
        return None
    proc = mp.get_context("fork").Process(target=_train_side, args=(out, cfgs), name="guidelab-demo-side")
    proc.start()  # not a daemon: its runs start batch workers of their own
    log.info("training (or reusing) the %s models in a second process, beside the main model", " and ".join(cfgs))
    return proc


def train_models(out: Path, progress: bool = True, fuse: bool = False, **overrides) -> dict[str, torch.nn.Module]:
    """Train (or reuse from ``out/models``) the main model, the autoguidance guide and the CFG model; ``fuse``:
    the main model's exact score as a compiled kernel (``train_toy(fuse=True)``; the short runs stay plain).
    With a core to spare, the guide and the CFG model train in a second process meanwhile (same weights)."""
    cfgs = {name: {**cfg, **overrides.get(name, {})} for name, cfg in MODELS.items()}
    side = _side_process(out, {k: c for k, c in cfgs.items() if k != "main"})
    nets = {}
    try:
        for name, c in cfgs.items():
            if side is not None and name != "main" and side.exitcode is None:
                log.info("waiting for the second process (the guide and CFG models)")
                side.join()
            if side is not None and side.exitcode not in (None, 0):
                raise GuidelabError(
                    f"training the small demo models in a second process failed (exit code {side.exitcode}); its error "
                    "is printed above; GUIDELAB_PREFETCH=0 trains everything in this process"
                )
            if progress and (side is None or name == "main"):
                log.info(
                    "training (or reusing) the %s model: classes %s, width %d, %d iterations",
                    name,
                    c["classes"],
                    c["hidden"],
                    c["iters"],
                )
            path = train_toy(out / "models", progress=progress, fuse=fuse and name == "main", **c)
            nets[name] = load_model(path).eval().requires_grad_(False)
            nets[name].checkpoint_path = path
    finally:
        if side is not None and side.is_alive():
            side.terminate()
            side.join()
    return nets


def run(
    out: str | os.PathLike = "runs/demo",
    *,
    n: int = 4096,
    seed: int = 0,
    progress: bool = True,
    weights: dict | None = None,
    model_overrides: dict | None = None,
    fuse: bool = False,
) -> list[Record]:
    """Run the whole demo; returns the records also written to ``out/metrics.json``; report.html and its figures
    are drawn by :func:`guidelab.app.report.demo_page`."""
    from .report import demo_page

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    nets = train_models(out, progress, fuse, **(model_overrides or {}))
    world = toy.tree("A")
    g = torch.Generator().manual_seed(seed)
    reference = world.sample(n, generator=g)  # exact samples: the metrics' reference set
    x_init = world.sample(n, SIGMA_MAX, generator=g)  # as in the paper: exact class-A points at sigma_max
    sigmas = schedules.karras(STEPS, SIGMA_MIN, SIGMA_MAX, RHO)

    jobs = [("none", 1.0)] + [(m, w) for m, ws in (weights or WEIGHTS).items() for w in ws]
    records, samples = [], {}
    from tqdm.auto import tqdm

    from .jobs.shards import BAR

    if progress:
        release()
    bar = tqdm(
        total=n * len(jobs), desc=f"sample + metrics ({len(jobs)} cells)", unit="sample", bar_format=BAR, disable=not progress
    )
    for method, w in jobs:
        bar.set_postfix_str(f"{method} w={w:g}")
        main, guide, uncond = (_Counter(nets[k]) for k in ("main", "guide", "uncond"))
        if method == "cfg":
            D = guidance.cfg(main, w, uncond=uncond)
        elif method == "autoguidance":
            D = guidance.autoguidance(main, guide, w)
        else:
            D = main
        t = time.time()
        x = samplers.heun(D, x_init, sigmas)
        nfe = (main.rows + guide.rows + uncond.rows) // n
        precision, recall = metrics.precision_recall(reference, x, k=3)
        records.append(
            Record(
                method,
                float(w),
                metrics.mean_logp(world, x),
                precision,
                recall,
                metrics.sliced_wasserstein(reference, x),
                nfe,
                time.time() - t,
            )
        )
        samples[(method, w)] = x
        bar.update(n)
    bar.close()
    exact = world.sample(n, generator=g)
    p, r = metrics.precision_recall(reference, exact, k=3)
    baseline = {
        "mean_logp": metrics.mean_logp(world, exact),
        "precision": p,
        "recall": r,
        "sliced_wasserstein": metrics.sliced_wasserstein(reference, exact),
    }

    prov = provenance.collect(
        device="cpu",
        **{k: v for name, net in nets.items() for k, v in provenance.files(**{f"model_{name}": net.checkpoint_path}).items()},
        world="A",
        sampler="heun",
        steps=STEPS,
        schedule=f"karras({STEPS}, {SIGMA_MIN:g}, {SIGMA_MAX:g}, rho={RHO:g})",
        seeds=f"torch.Generator seed {seed}: reference, then initial points, then exact samples",
        samples=n,
        guider=",".join(dict.fromkeys(m for m, _ in jobs)),
        weight=json.dumps({m: list(ws) for m, ws in (weights or WEIGHTS).items()}),
        guider_options="cfg: uncond=the AB model; autoguidance: guide=the small, short-trained A model",
    )
    atomic_write(
        out / "metrics.json",
        json.dumps({"records": [r.__dict__ for r in records], "provenance": prov}, indent=2).encode(),
    )
    findings = check_finding(records)
    html_text, figures = demo_page(
        records,
        samples,
        exact,
        baseline,
        findings,
        nets,
        n=n,
        seconds=time.time() - t0,
        scatter=scatter_figure,
        models=MODELS,
        grid=(STEPS, SIGMA_MIN, SIGMA_MAX, RHO),
        provenance=prov,
    )
    for name, png in figures.items():
        atomic_write(out / name, png)
        provenance.stamp_png(out / name, prov)
    atomic_write(out / "report.html", html_text.encode())
    return records


# ---------------------------------------------------------------------------------------------
# The paper's claim, checked on the measured numbers (never tuned to agree).


def check_finding(records: list[Record]) -> list[tuple[str, bool, str]]:
    """Evaluate the paper's three claims on the records: (claim, holds, evidence)."""
    none = next(r for r in records if r.method == "none")
    ag = [r for r in records if r.method == "autoguidance"]
    cfg = [r for r in records if r.method == "cfg"]
    out = []
    if not ag or not cfg:
        return out
    best = max(ag, key=lambda r: r.mean_logp)
    out.append(
        (
            "Autoguidance raises quality over no guidance (mean log p and precision)",
            best.mean_logp > none.mean_logp and best.precision > none.precision,
            f"w={best.w:g}: mean log p {none.mean_logp:.3f} -> {best.mean_logp:.3f}, "
            f"precision {none.precision:.3f} -> {best.precision:.3f}",
        )
    )
    out.append(
        (
            "...while recall stays close to unguided (>= 0.9x)",
            best.recall >= 0.9 * none.recall,
            f"recall {none.recall:.3f} -> {best.recall:.3f} ({best.recall / none.recall:.2f}x)",
        )
    )
    # CFG at the weight whose quality is closest to autoguidance's (or the best CFG if none reaches it).
    match = min(cfg, key=lambda r: abs(r.mean_logp - best.mean_logp))
    out.append(
        (
            "CFG at similar quality loses clearly more recall",
            match.recall < best.recall - 0.05,
            f"CFG w={match.w:g}: mean log p {match.mean_logp:.3f}, recall {match.recall:.3f} vs "
            f"autoguidance recall {best.recall:.3f}",
        )
    )
    return out


# ---------------------------------------------------------------------------------------------
# Figures (the page itself: guidelab.app.report.demo_page).


@functools.lru_cache(None)
def _outline_grid(grid: int = 220):
    """Exact log-densities of classes AB and A on the view grid (computed once per process)."""
    cx, cy, h = VIEW
    xs = torch.linspace(cx - h, cx + h, grid, dtype=torch.float64)
    ys = torch.linspace(cy - h, cy + h, grid, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, ys, indexing="xy")
    pts = torch.stack([X.flatten(), Y.flatten()], 1)
    return (
        X.numpy(),
        Y.numpy(),
        {c: toy.tree(c, dtype=torch.float64).logp(pts, 0.0).view(grid, grid).numpy() for c in ("AB", "A")},
    )


def _outline(ax) -> None:
    """Exact density outlines (the paper's level: log p = max - 2.12^2) of classes AB (grey) and A (orange)."""
    X, Y, lps = _outline_grid()
    for classes, color in (("AB", "0.6"), ("A", "tab:orange")):
        lp = lps[classes]
        ax.contour(X, Y, lp, levels=[lp.max() - 2.12**2], colors=[color], linewidths=0.8, linestyles="solid")


def scatter_figure(panels: list[tuple[str, torch.Tensor]]):
    """A row/grid of scatter plots with the exact outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    cx, cy, h = VIEW
    for ax, (title, x) in zip(axes.flat, panels):
        _outline(ax)
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=1.0, alpha=0.35, color="tab:blue", linewidths=0)
        ax.set_xlim(cx - h, cx + h)
        ax.set_ylim(cy - h, cy + h)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=10)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig
