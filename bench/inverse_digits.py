"""Every inverse-problem method on a *trained* unconditional digits model, at equal NFE, against the
held-out truth (docs/INVERSE.md, "Digits with a trained network").

The model: an unconditional PixelMLP trained with ``guidelab train`` (the command is in docs/INVERSE.md).
The images: every digit of the fixed test split (360), one completion each, per-sample seeds. Tasks:

* ``inpaint-centre``: the centre 4x4 of the 8x8 digit missing; ``inpaint-random``: each pixel known with
  probability 1/2 (one fixed mask, seed 0, as ``guidelab inverse --mask random``);
* ``superres``: 2x super-resolution, ``y`` = the 4x4 average-pooled digit (ILVR's ``phi_2``);
* ``lowpass``: "fill in from a low-pass reference", ``y`` = the 2x2 low-pass (``phi_4``), ILVR's use.

Columns (features: the shipped clean digits classifier's 128-d penultimate layer, as ``guidelab evaluate``):

* ``FD filled``: Frechet distance between the features of the test digits and of the completions with
  the observed part put back (``x - P x + A^+ y``; for a mask: the method's pixels in the masked region
  only, the "masked-region FD"); ``FD raw``: the same on the method's own output;
* ``|Ax-y|``: mean measurement error of the raw output (L2 over the measurement);
* ``class``: share of completions the classifier assigns to the original's label (raw output);
* ``NFE``: denoiser evaluations per sample, counted (``inverse.Counting``); ``bwd``: backward passes
  through the denoiser per sample; ``s``: seconds (one CPU thread).

Step sizes of the gradient methods (steered-gradient, DPS, TFG-DPS, SDG, TSDiff) are picked from a
small grid on 256 *training* digits (never the test digits) by ``FD filled``; a step size whose raw output
is further from the measurement than zero is (``diverged``) is never picked.

Usage: python bench/inverse_digits.py RUN_DIR [--tasks inpaint-centre,...] [--budget 32,256] [--paper] [--methods ...]
[--figures docs/img]
Prints Markdown tables (paste into docs/INVERSE.md) and writes docs/img/inverse_digits_<task>.png.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from guidelab import inverse, metrics, samplers, schedules
from guidelab.data import digits
from guidelab.errors import GuidelabError
from guidelab.guidance.tfg import measurement_objective, tfg_sample
from guidelab.inverse.tasks import make_task, measurement_energy
from guidelab.rng import SampleNoise

SHAPE = (1, 8, 8)
TASKS = {  # name: (make_task task, options)
    "inpaint-centre": ("inpaint", dict(mask="centre")),
    "inpaint-random": ("inpaint", dict(mask="random", seed=0)),
    "superres": ("superres", dict(factor=2)),
    "lowpass": ("lowpass", dict(factor=4)),
}


def operator(task: str) -> inverse.Operator:
    kind, opts = TASKS[task]
    return make_task(kind, torch.zeros(SHAPE), **opts)[0]


def repaint_steps(budget: int, jl: int = 4, jn: int = 2) -> int:
    """The most steps whose RePaint NFE (n + J (jn - 1) jl) fits the budget."""
    return max(n for n in range(1, budget + 1) if n + len(range(0, n - jl, jl)) * (jn - 1) * jl <= budget)


def _sdg(D, x, s, op, y, nz, hp):
    return samplers.euler_ancestral(inverse.energy(D, measurement_energy(op, y), hp), x, s, noise=nz)


METHODS = {
    # name: (needs: None / "projection" / "mask" / "lowpass", NFE per step (None: RePaint's schedule),
    #        step-size grid or None, backward passes through D per NFE, run(D, x, sigmas, op, y, noise, hp))
    "unconditional": (None, 1, None, 0, lambda D, x, s, op, y, nz, hp: samplers.euler_ancestral(D, x, s, noise=nz)),
    "repaint (j=1)": (
        "projection",
        1,
        None,
        0,
        lambda D, x, s, op, y, nz, hp: inverse.repaint(D, x, s, op, y, jump_length=1, jump_n_sample=1, noise=nz),
    ),
    "repaint (j=4, r=2)": (
        "projection",
        None,
        None,
        0,
        lambda D, x, s, op, y, nz, hp: inverse.repaint(D, x, s, op, y, jump_length=4, jump_n_sample=2, noise=nz),
    ),
    "repaint (j=10, r=10)": (
        "projection",
        None,
        None,
        0,
        lambda D, x, s, op, y, nz, hp: inverse.repaint(D, x, s, op, y, jump_length=10, jump_n_sample=10, noise=nz),
    ),
    "ilvr": (
        "lowpass",
        1,
        None,
        0,
        lambda D, x, s, op, y, nz, hp: inverse.ilvr(D, x, s, op.pinv(y), operator=op, noise=nz),
    ),
    "score-sde": ("projection", 2, None, 0, lambda D, x, s, op, y, nz, hp: inverse.score_sde_impute(D, x, s, op, y, noise=nz)),
    "steered (projection)": (
        "projection",
        1,
        None,
        0,
        lambda D, x, s, op, y, nz, hp: inverse.steered(D, x, s, op, y, mode="projection", noise=nz),
    ),
    "steered (gradient)": (
        None,
        1,
        (1.0, 3.0, 10.0, 30.0, 100.0, 300.0),
        1,
        lambda D, x, s, op, y, nz, hp: inverse.steered(D, x, s, op, y, scale=hp, noise=nz),
    ),
    "dps": (
        None,
        1,
        (0.3, 1.0, 3.0, 10.0, 30.0),
        1,
        lambda D, x, s, op, y, nz, hp: inverse.dps(D, x, s, op, y, zeta=hp, noise=nz),
    ),
    "tfg-dps": (
        None,
        1,
        (0.3, 1.0, 3.0, 10.0, 30.0),
        1,
        lambda D, x, s, op, y, nz, hp: tfg_sample(D, x, s, measurement_objective(op, y), preset="dps", rho=hp, noise=nz),
    ),
    "sdg (energy)": (None, 1, (1.5, 2.0, 4.0, 8.0, 16.0, 64.0), 0, _sdg),
    "tsdiff (mse)": (
        "mask",
        1,
        (1.0, 4.0, 16.0, 64.0, 256.0),
        1,
        lambda D, x, s, op, y, nz, hp: inverse.tsdiff_guided(D, x, s, op.pinv(y), op.mask, scale=hp, guidance="mse", noise=nz),
    ),
}


#: The papers' settings (``inverse.tasks.DEFAULTS``; TSDiff: 100 steps, scale 4; steered-gradient: the code's scale 1):
#: method -> (steps, step size). Only in the ``--paper`` table; RePaint's j = r = 10 only there.
PAPER = {
    "repaint (j=10, r=10)": (250, None),
    "ilvr": (1000, None),
    "score-sde": (1000, None),
    "steered (projection)": (100, None),
    "steered (gradient)": (100, 1.0),
    "dps": (1000, 1.0),
    "tfg-dps": (50, 1.0),
    "sdg (energy)": (100, 2.0),
    "tsdiff (mse)": (100, 4.0),
}
EQUAL_NFE = [m for m in METHODS if m != "repaint (j=10, r=10)"]


def applies(need, op) -> bool:
    if need == "projection":
        return op.projection
    if need == "mask":
        return isinstance(op, inverse.Mask)
    if need == "lowpass":
        return isinstance(op, inverse.Downsample)
    return True


class Scorer:
    """FD / class accuracy in the shipped digits classifier's features (``app.evaluate.DigitsMetrics``'s extractor)."""

    def __init__(self):
        from guidelab.app.digits_cache import digits_classifier

        self.clf = digits_classifier()
        self.extractor = self.clf.extractor()

    def fd(self, a: torch.Tensor, b: torch.Tensor) -> float:
        fa, fb = self.extractor(a.clamp(-1, 1)), self.extractor(b.clamp(-1, 1))
        return metrics.fid_from_stats(metrics.FeatureStats(fa.shape[1]).update(fa), metrics.FeatureStats(fb.shape[1]).update(fb))

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.clf(x.clamp(-1, 1)).argmax(1) == labels).double().mean())


def filled(op, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x - P x + A^+ y``: the observed part of ``x`` put back (a mask: the method's pixels only where unknown)."""
    return x - op.project(x) + op.pinv(y).reshape(x.shape)


def run(D, name: str, op, truth: torch.Tensor, budget: int, seed0: int, hp, sigma_max: float, steps: int | None = None):
    """``name`` on the digits ``truth``: (samples, y, NFE per sample, seconds); ``steps`` default: the most that
    fit ``budget``."""
    _, per_step, _, _, fn = METHODS[name]
    if steps is None:
        steps = repaint_steps(budget, *((10, 10) if "j=10" in name else (4, 2))) if per_step is None else budget // per_step
    sigmas = schedules.karras(steps, 0.002, sigma_max)
    noise = SampleNoise(range(seed0, seed0 + len(truth)))
    x = noise.randn(list(SHAPE)) * sigmas[0]
    counted = inverse.Counting(D)
    y = op(truth)
    t0 = time.time()
    out = fn(counted, x, sigmas, op, y, noise, hp)
    return out, y, counted.nfe, time.time() - t0


def diverged(op, x: torch.Tensor, y: torch.Tensor) -> bool:
    """The raw output is further from the measurement than zero is (``mean |Ax - y| > mean |y|``): a step size
    that blew up. ``FD filled`` alone would hide it (it pastes the observation back)."""
    err = torch.linalg.vector_norm((op(x) - y).flatten(1), dim=1).mean()
    return bool(err > torch.linalg.vector_norm(y.flatten(1), dim=1).mean())


def table(
    D, task: str, scorer: Scorer, budget: int | None, sigma_max: float, figures: str | None, only: set[str] | None = None
) -> str:
    """One task's table at ``budget`` NFE per sample (step sizes tuned), or at the papers' settings (``budget=None``)."""
    op = operator(task)
    test, train = digits("test"), digits("train")
    tune = train.images[torch.randperm(len(train.images), generator=torch.Generator().manual_seed(1))[:256]]
    truth, labels = test.images, test.labels
    what = f"budget {budget} NFE" if budget else "the papers' steps and step sizes (NFE differ)"
    lines = [
        f"#### digits {task}: {op!r}, {len(truth)} test digits, {what}",
        "",
        "| method | steps | step size | FD filled | FD raw | \\|Ax-y\\| | class | NFE | bwd | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    y = op(truth)
    lifted = op.pinv(y).reshape(truth.shape)
    fd_obs = scorer.fd(truth, lifted)
    acc = scorer.accuracy(lifted, labels)
    lines.append(f"| observation only (A^+ y) | | | {fd_obs:.2f} | {fd_obs:.2f} | 0.0000 | {acc:.3f} | 0 | 0 | 0.0 |")
    outputs = {}
    for name in EQUAL_NFE if budget else PAPER:
        if only is not None and name not in only:
            continue
        need, per_step, grid, bwd, _ = METHODS[name]
        if not applies(need, op):
            continue
        steps, hp = PAPER[name] if not budget else (None, None)
        if budget and grid:  # tuned on training digits by FD filled

            def tuning(h, name=name):
                try:
                    x, yt, _, _ = run(D, name, op, tune, budget, 10_000, h, sigma_max)
                except GuidelabError:
                    return math.inf
                if not bool(torch.isfinite(x).all()) or diverged(op, x, yt):
                    return math.inf
                v = scorer.fd(tune, filled(op, x, yt))
                return v if math.isfinite(v) else math.inf

            hp = min(grid, key=tuning)
        if steps is None:
            steps = repaint_steps(budget, *((10, 10) if "j=10" in name else (4, 2))) if per_step is None else budget // per_step
        x, y, nfe, secs = run(D, name, op, truth, budget or 0, 0, hp, sigma_max, steps)
        outputs[name] = x
        cons = float(torch.linalg.vector_norm((op(x) - y).flatten(1), dim=1).mean())
        lines.append(
            f"| {name} | {steps} | {'' if hp is None else f'{hp:g}'} | {scorer.fd(truth, filled(op, x, y)):.2f} | "
            f"{scorer.fd(truth, x):.2f} | {cons:.4f} | {scorer.accuracy(x, labels):.3f} | {nfe} | {nfe * bwd} | {secs:.1f} |"
        )
        print(f"  {task}: {name} done ({secs:.1f} s)", flush=True)
    if figures:
        figure(task, truth, lifted, outputs, f"{figures}/inverse_digits_{task}.png")
    return "\n".join(lines)


def figure(task: str, truth, lifted, outputs: dict, path: str, k: int = 10) -> None:
    """Rows: truth, observation (A^+ y), each method; columns: the first test digit of each class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [int((digits("test").labels == c).nonzero()[0]) for c in range(k)]
    rows = [("truth", truth), ("observed", lifted), *outputs.items()]
    fig, axes = plt.subplots(len(rows), k, figsize=(k * 0.5 + 1.2, len(rows) * 0.52))
    for r, (name, imgs) in enumerate(rows):
        for c, i in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(imgs[i].reshape(8, 8).clamp(-1, 1), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=5, rotation=0, ha="right", va="center")
    fig.suptitle(f"digits {task}", fontsize=7)
    fig.subplots_adjust(left=0.22, right=0.99, top=0.95, bottom=0.01, wspace=0.05, hspace=0.05)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="a run folder (post-hoc EMA) or checkpoint of an unconditional digits model")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--budget", default="32", help="denoiser evaluations per sample; a comma list gives one table each")
    p.add_argument("--methods", default=None, help="only these methods (comma list of the table's names)")
    p.add_argument("--paper", action="store_true", help="also a table at the papers' steps and step sizes")
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--sigma-rel", type=float, default=0.10, help="post-hoc EMA of a run folder")
    p.add_argument("--figures", default=None, help="folder for one grid per task (docs/img)")
    a = p.parse_args()
    torch.set_num_threads(1)
    from guidelab.training.phema import load_network

    net = load_network(a.model, a.sigma_rel)
    net.eval().requires_grad_(False)
    condition = getattr(net, "condition", None)
    if condition is not None:  # a label-dropout model: with its null label it is the unconditional model
        null = dict(condition.null)

        def D(x, sigma, **cond):
            return net(x, sigma, **null)
    else:
        D = net
    scorer = Scorer()
    test, train = digits("test"), digits("train")
    print(
        f"reference: FD(train digits, test digits) = {scorer.fd(test.images, train.images):.2f}; "
        f"classifier accuracy on the test digits = {scorer.accuracy(test.images, test.labels):.3f}\n"
    )
    budgets = [int(b) for b in a.budget.split(",")]
    only = set(a.methods.split(",")) if a.methods else None
    for task in a.tasks.split(","):
        for i, budget in enumerate([*budgets, *([None] if a.paper else [])]):
            print(table(D, task, scorer, budget, a.sigma_max, a.figures if i == 0 else None, only), flush=True)
            print()


if __name__ == "__main__":
    main()
