"""One picture per guider of the zoo on the exact tree world (docs/img/guidance/<name>.png).

    python bench/guidance_figures.py                 # every entry
    python bench/guidance_figures.py --only apg icg  # some entries
    python bench/guidance_figures.py --n 512         # fewer samples (faster)

Each entry of ``ENTRIES`` is a function ``(n) -> [(title, samples), ...]`` (one panel each); add a
method by adding one function and one line to ``ENTRIES``. Grey: exact samples of class A (light: B);
orange: the panel's samples, with k-NN precision/recall against class A in the title. Worlds: the
leaky conditional tree (label 0 = 0.7 A + 0.3 B, null = AB) unless the entry says otherwise; EDM Heun,
karras(32, 0.002, 5), start from exact samples of p_AB(x; 5). Classifier, TFG, FKC and SuperDiff have
their pictures from bench/guidance_gradient_figures.py.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import tempfile
import time

import torch

from guidelab import guidance as G
from guidelab import metrics, samplers, schedules, toy
from guidelab.training import load_model, snapshot_path, train_toy

SIG = schedules.karras(32, 0.002, 5.0, dtype=torch.float32)
OUT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "img" / "guidance"
LEAKY, PERFECT = toy.conditional_tree(leak=0.3), toy.conditional_tree()


def _x0(n):
    return toy.tree("AB").sample(n, 5.0, generator=torch.Generator().manual_seed(0))


def _heun(d, n, sampler=samplers.heun, sigmas=SIG, label=True):
    cond = {"label": torch.zeros(n, dtype=torch.long)} if label else None
    with torch.no_grad():
        return sampler(d, _x0(n), sigmas, cond=cond)


@functools.lru_cache(None)
def _toymlp():
    """A small ToyMLP on class A (300 iters) and its EMA snapshot at 40 iters (the autoguidance guide)."""
    final = train_toy(
        tempfile.mkdtemp(prefix="guidelab-fig-"),
        classes="A",
        hidden=32,
        depth=3,
        output="denoiser",
        loss="edm",
        iters=300,
        batch=512,
        snapshot_every=20,
        progress=False,
    )
    return load_model(final), load_model(snapshot_path(final.parent, 40, 0.010))


def cfg(n):
    return [
        ("unguided (leaky label A)", _heun(LEAKY, n)),
        ("CFG w = 2", _heun(G.cfg(LEAKY, 2.0), n)),
        ("CFG w = 4", _heun(G.cfg(LEAKY, 4.0), n)),
    ]


def rescale(n):
    return [
        ("CFG w = 8", _heun(G.cfg(LEAKY, 8.0), n)),
        ("rescale phi = 0.7 (v), w = 8", _heun(G.rescale(G.cfg(LEAKY, 8.0), 0.7), n)),
        ("rescale phi = 0.7 (x0), w = 8", _heun(G.rescale(G.cfg(LEAKY, 8.0), 0.7, space="x0"), n)),
    ]


def cfg_zero_star(n):
    return [
        ("CFG w = 8", _heun(G.cfg(LEAKY, 8.0), n)),
        ("CFG-Zero* w = 8", _heun(G.cfg_zero_star(G.cfg(LEAKY, 8.0), zero_steps=0), n)),
        ("CFG-Zero* w = 8, zero-init 1st step", _heun(G.cfg_zero_star(G.cfg(LEAKY, 8.0), zero_init_sigma=float(SIG[0])), n)),
    ]


def autoguidance(n):
    net, early = _toymlp()
    return [
        ("ToyMLP (300 it), unguided", _heun(net, n, label=False)),
        ("autoguidance w = 2, guide = 40-it snapshot", _heun(G.autoguidance(net, early, 2.0), n, label=False)),
        ("autoguidance w = 3", _heun(G.autoguidance(net, early, 3.0), n, label=False)),
    ]


def icg(n):
    return [
        ("unguided (leaky label A)", _heun(LEAKY, n)),
        ("CFG w = 4 (null label)", _heun(G.cfg(LEAKY, 4.0), n)),
        ("ICG w = 4 (random label)", _heun(G.icg(LEAKY, 4.0, seeds=range(n)), n)),
    ]


def tsg(n):
    net, _ = _toymlp()
    return [
        ("ToyMLP unguided", _heun(net, n, label=False)),
        (
            "TSG vector (dim 32) w = 3, s = 0.3, alpha = 0",
            _heun(G.tsg(net, 3.0, s=0.3, alpha=0.0, dim=net.hidden, seeds=range(n)), n, label=False),
        ),
        (
            "TSG scalar c_noise w = 2, s = 0.3, alpha = 0",
            _heun(G.tsg(net, 2.0, s=0.3, alpha=0.0, form="scalar", seeds=range(n)), n, label=False),
        ),
    ]


def cfgpp(n):
    sig = schedules.karras(16, 0.002, 5.0, dtype=torch.float32)
    return [
        ("CFG w = 2, Euler 16", _heun(G.cfg(LEAKY, 2.0), n, samplers.euler, sig)),
        ("CFG++ lam = 0.5, Euler 16", _heun(G.cfgpp(LEAKY, 0.5), n, samplers.euler, sig)),
        ("CFG++ lam = 0.5, DPM++ 2M 16", _heun(G.cfgpp(LEAKY, 0.5), n, samplers.dpmpp_2m, sig)),
    ]


def interval(n):
    return [
        ("CFG w = 3 (perfect label A)", _heun(G.cfg(PERFECT, 3.0), n)),
        ("interval (0.28, 1.61], w = 3", _heun(G.interval(G.cfg(PERFECT, 3.0), 0.28, 1.61), n)),
        ("interval (0.28, 1.61], w = 5", _heun(G.interval(G.cfg(PERFECT, 5.0), 0.28, 1.61), n)),
    ]


def apg(n):
    return [
        ("CFG w = 8", _heun(G.cfg(LEAKY, 8.0), n)),
        ("APG w = 8, eta = 0", _heun(G.apg(G.cfg(LEAKY, 8.0), eta=0.0), n)),
        ("APG w = 8, eta = 0, r = 1, beta = -0.5", _heun(G.apg(G.cfg(LEAKY, 8.0), eta=0.0, r=1.0, beta=-0.5), n)),
    ]


def epsilon_scaling(n):
    net, _ = _toymlp()
    sig = schedules.karras(13, 0.002, 5.0, dtype=torch.float32)
    return [
        ("ToyMLP, Euler 13", _heun(net, n, samplers.euler, sig, label=False)),
        ("eps scaling 1.0048 (EDM-ES Euler)", _heun(G.epsilon_scaling(net, 1.0048), n, samplers.euler, sig, label=False)),
        ("eps scaling 1.02", _heun(G.epsilon_scaling(net, 1.02), n, samplers.euler, sig, label=False)),
    ]


ENTRIES = {f.__name__: f for f in (cfg, rescale, cfg_zero_star, autoguidance, icg, tsg, cfgpp, interval, apg, epsilon_scaling)}


# Guidance zoo II (issue 16): post-CFG rules and weight schedules. FDG needs images (no 2-D picture);
# Perp-Neg is CFG on the tree (the negative class lies on the positive line); CADS needs a float embedding.


def tcfg(n):
    return [
        ("CFG w = 8", _heun(G.cfg(LEAKY, 8.0), n)),
        ("TCFG w = 8 (eps)", _heun(G.tcfg(G.cfg(LEAKY, 8.0)), n)),
        ("TCFG w = 4 (eps)", _heun(G.tcfg(G.cfg(LEAKY, 4.0)), n)),
    ]


def cfg_norm(n):
    return [
        ("CFG w = 8", _heun(G.cfg(LEAKY, 8.0), n)),
        ("CFGNorm w = 8 (x0, per sample)", _heun(G.cfg_norm(G.cfg(LEAKY, 8.0), per="sample"), n)),
        ("CFGNorm w = 8 (flow, per sample)", _heun(G.cfg_norm(G.cfg(LEAKY, 8.0), per="sample", space="flow"), n)),
    ]


def mag(n):
    return [
        ("CFG w = 8", _heun(G.cfg(LEAKY, 8.0), n)),
        ("MAG w = 8, alpha = 1", _heun(G.mag(G.cfg(LEAKY, 8.0), alpha=1.0), n)),
        ("MAG w = 8, alpha = 0.3", _heun(G.mag(G.cfg(LEAKY, 8.0), alpha=0.3), n)),
    ]


def dynamic_thresholding(n):
    return [
        ("CFG w = 8", _heun(G.cfg(LEAKY, 8.0), n)),
        ("dyn. threshold w = 8, c = 1", _heun(G.dynamic_thresholding(G.cfg(LEAKY, 8.0), max_value=1.0), n)),
        ("dyn. threshold w = 8, c = 0.8", _heun(G.dynamic_thresholding(G.cfg(LEAKY, 8.0), max_value=0.8), n)),
    ]


def weight_schedule(n):
    ws = G.weight_schedule
    return [
        ("CFG w = 4", _heun(G.cfg(LEAKY, 4.0), n)),
        ("linear 1 -> 7 (time)", _heun(G.cfg(LEAKY, ws("linear", 1.0, 7.0)), n)),
        ("cosine 7 -> 1 (time)", _heun(G.cfg(LEAKY, ws("cosine", 7.0, 1.0)), n)),
        ("steps 4, [17, 22] of 32", _heun(G.cfg(LEAKY, ws("steps", 4.0, start=17, stop=22)), n)),
    ]


ENTRIES.update({f.__name__: f for f in (tcfg, cfg_norm, mag, dynamic_thresholding, weight_schedule)})


def draw(name: str, panels, n: int) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = toy.tree("A").sample(n, 0.0, generator=torch.Generator().manual_seed(1))
    refb = toy.tree("B").sample(n // 2, 0.0, generator=torch.Generator().manual_seed(2))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, x) in zip(axes[0], panels):
        p, r = metrics.precision_recall(ref, x)
        ax.scatter(*refb.T, s=1, c="0.88", lw=0)
        ax.scatter(*ref.T, s=1, c="0.6", lw=0)
        ax.scatter(*x.T, s=1.5, c="tab:orange", lw=0)
        ax.set_title(f"{title}\nP {p:.2f}  R {r:.2f}", fontsize=8)
        ax.set_xlim(-1.3, 1.9)
        ax.set_ylim(-1.3, 1.9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=72, bbox_inches="tight")
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(ENTRIES), help="entries to draw (default: all)")
    ap.add_argument("--n", type=int, default=1024, help="samples per panel")
    args = ap.parse_args()
    for name in args.only or ENTRIES:
        t = time.time()
        path = draw(name, ENTRIES[name](args.n), args.n)
        print(f"{name}: {path} ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
