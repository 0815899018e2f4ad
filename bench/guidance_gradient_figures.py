"""Pictures of classifier guidance, TFG, FKC and SuperDiff on the exact tree world.

    python bench/guidance_gradient_figures.py                  # -> docs/img/guidance/{classifier,tfg,fkc,superdiff}.png
    python bench/guidance_gradient_figures.py --only fkc --n 1024

Grey: exact samples of the data (tree A and B; for SuperDiff, its two models); colour: the method's
samples (orange: class A by the exact posterior, blue: class B; SuperDiff: orange). Exact denoisers, EDM
schedule (karras, sigma in [0.002, 5]), start from exact samples of p_AB(x; 5), per-sample seeds.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np
import torch

from guidelab import samplers, schedules, toy
from guidelab.guidance import cfg, classifier, fkc_sample, superdiff, tfg_sample
from guidelab.metrics import sliced_wasserstein
from guidelab.models.classifier import train_tree_classifier, tree_classifier
from guidelab.rng import SampleNoise
from guidelab.toy.mixture import GaussianMixture
from guidelab.toy.tree import _components

SIGMAS = schedules.karras(32, 0.002, 5, dtype=torch.float32)
SIGMAS_SDE = schedules.karras(64, 0.002, 5, dtype=torch.float32)


def _start(n: int, seed: int = 0) -> torch.Tensor:
    return toy.tree("AB").sample(n, 5.0, generator=torch.Generator().manual_seed(seed))


def _label(n: int) -> dict:
    return {"label": torch.zeros(n, dtype=torch.long)}


def classifier_panels(n: int):
    AB, x = toy.tree("AB"), _start(n)
    exact, net = tree_classifier(), train_tree_classifier(steps=600, n_data=16384)
    run = lambda clf, w: samplers.heun(classifier(AB, clf, w), x, SIGMAS, cond=_label(n))  # noqa: E731
    return [
        ("unguided p_AB (w = 1)", "AB", samplers.heun(AB, x, SIGMAS)),
        ("exact classifier, w = 2 (= p_A)", "A", run(exact, 2.0)),
        ("trained ToyClassifier, w = 2", "A", run(net, 2.0)),
        ("trained ToyClassifier, w = 4", "A", run(net, 4.0)),
    ]


def tfg_panels(n: int):
    AB, x = toy.tree("AB"), _start(n)
    exact = tree_classifier()

    def log_p_a(y):
        return exact(y, torch.full((y.shape[0],), 0.1)).log_softmax(1)[:, 0]

    def run(preset, **kw):
        return tfg_sample(AB, x, SIGMAS, log_p_a, preset=preset, noise=SampleNoise(range(n)), **kw)

    return [
        ("unguided (DDPM steps)", "AB", samplers.euler_ancestral(AB, x, SIGMAS, noise=SampleNoise(range(n)))),
        ("TFG-DPS, rho = 0.02", "A", run("dps", rho=0.02)),
        ("TFG-MPGD, mu = 0.02", "A", run("mpgd", mu=0.02)),
        ("TFG (rho = mu = 0.02, gamma 0.01)", "A", run("tfg", rho=0.02, mu=0.02)),
    ]


def fkc_panels(n: int, w: float = 3.0):
    A, AB, ct = toy.tree("A"), toy.tree("AB"), toy.conditional_tree()
    g = torch.Generator().manual_seed(1)
    proposal = A.sample(65536, 0.0, generator=g)
    log_w = (w - 1) * (A.logp(proposal) - AB.logp(proposal)).double()
    pick = lambda k: proposal[torch.multinomial(torch.softmax(log_w, 0), k, replacement=True, generator=g)]  # noqa: E731
    ref, tilted = pick(8192), pick(n)
    x, guider = _start(n), cfg(ct, w)
    panels = [
        (f"exact p_A^{w:g} p_AB^{1 - w:g}", tilted),
        (f"CFG w = {w:g}, ODE (heun)", samplers.heun(guider, x, SIGMAS, cond=_label(n))),
        (f"CFG w = {w:g}, SDE", samplers.euler_ancestral(guider, x, SIGMAS_SDE, cond=_label(n), noise=SampleNoise(range(n)))),
        (f"FKC w = {w:g} (SDE + weights)", fkc_sample(guider, x, SIGMAS_SDE, cond=_label(n), noise=SampleNoise(range(n)))),
    ]
    # Title: sliced Wasserstein distance to 8192 exact samples of the tilted density.
    return [(f"{t}\nSW to exact {sliced_wasserstein(pts, ref):.3f}", "tilted", pts) for t, pts in panels]


def _tree_a_moved(shift) -> GaussianMixture:
    """Class A of the tree, translated by ``shift`` (a second model that overlaps the first in places)."""
    cls, phi, mu, Sigma = _components()
    sel = cls == "A"
    return GaussianMixture(phi[sel], mu[sel] + np.asarray(shift), Sigma[sel])


def superdiff_panels(n: int):
    A, A2, x = toy.tree("A"), _tree_a_moved((0.35, -0.35)), _start(n)
    g = torch.Generator().manual_seed(7)
    both = torch.cat([A.sample(2048, 0.0, generator=g), A2.sample(2048, 0.0, generator=g)])
    return [
        ("model 1: p_A", both, samplers.heun(A, x, SIGMAS)),
        ("model 2: p_A moved by (0.35, -0.35)", both, samplers.heun(A2, x, SIGMAS)),
        ("SuperDiff OR (mixture)", both, superdiff(A, A2, x, SIGMAS_SDE, mode="or", noise=SampleNoise(range(n)))),
        ("SuperDiff AND (equal densities)", both, superdiff(A, A2, x, SIGMAS_SDE, mode="and", noise=SampleNoise(range(n)))),
    ]


FIGURES = {"classifier": classifier_panels, "tfg": tfg_panels, "fkc": fkc_panels, "superdiff": superdiff_panels}


def render(name: str, n: int, out_dir: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = FIGURES[name](n)
    ref = toy.tree("AB").sample(4096, 0.0, generator=torch.Generator().manual_seed(7))
    post = tree_classifier()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.8))
    for ax, (title, bg, pts) in zip(axes, panels):
        by_class = not isinstance(bg, torch.Tensor)  # tree panels: colour by exact class
        ax.scatter(*(ref if by_class else bg).T, s=0.5, c="0.85", rasterized=True)
        is_a = post.posterior(pts.float(), 0.002)[:, 0] > 0.5 if by_class else torch.ones(len(pts), dtype=torch.bool)
        ax.scatter(*pts[is_a].T, s=1.5, c="tab:orange", rasterized=True)
        ax.scatter(*pts[~is_a].T, s=1.5, c="tab:blue", rasterized=True)
        ax.set_title(title, fontsize=9)
        lo, hi = (-1.4, 1.6) if by_class else (float(bg.min()) - 0.1, float(bg.max()) + 0.1)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2048, help="samples per panel")
    ap.add_argument("--only", choices=sorted(FIGURES), action="append", help="render only these figures")
    ap.add_argument("--out", default="docs/img/guidance", help="output folder")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the exact world is many tiny ops: threads only spin
    for name in args.only or FIGURES:
        t = time.time()
        print(render(name, args.n, pathlib.Path(args.out)), f"{time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
