"""Every inverse-problem method at equal NFE against the exact posterior (docs/INVERSE.md).

Worlds: the autoguidance tree (class A) and ``toy.digits_gmm`` (8x8 digit images, one probabilistic-PCA
Gaussian per class); posteriors by ``toy.linear_posterior``. Per task, every method that applies runs
from the same per-sample seeds at the same budget of denoiser evaluations per sample; gradient methods'
step sizes are picked from a small grid on a *separate* block of seeds (tuning seeds 10_000+), by the
sliced Wasserstein distance to exact posterior samples. Columns:

* ``logp mean / median``: exact ``log p(x0 | y)`` of the samples (noise-free tasks: of their orthogonal
  projections onto ``{A x = y}``, the posterior's support; a sample off it has density 0);
* ``|Ax-y|``: mean measurement error; ``SW``: sliced Wasserstein distance to exact posterior samples;
  ``P / R``: k-NN precision / recall against exact posterior samples (k = 3);
* digits: ``class``: fraction of samples whose most probable prior component (= digit class) is the
  true image's class;
* ``NFE``: denoiser evaluations per sample actually made (``inverse.Counting``); ``bwd``: backward passes
  through the denoiser per sample.

Usage: python bench/inverse_table.py [--tasks tree-inpaint,...] [--n 512] [--budget 32] [--figures docs/img/inverse]
Prints Markdown tables (paste into docs/INVERSE.md).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import torch

from guidelab import inverse, metrics, samplers, schedules, toy
from guidelab.errors import GuidelabError
from guidelab.guidance.tfg import measurement_objective, tfg_sample
from guidelab.inverse import series as series_data
from guidelab.rng import SampleNoise


@dataclass
class Task:
    name: str
    prior: object
    op: object
    y: torch.Tensor
    noise_std: float
    sigma_max: float
    truth: torch.Tensor | None = None
    ref: torch.Tensor | None = None  # ILVR's reference image (the truth)
    post: object = field(init=False)

    def __post_init__(self):
        self.post = toy.linear_posterior(self.prior, self.op.matrix().float(), self.y.flatten(), self.noise_std)


def tasks() -> dict[str, Task]:
    tree = toy.tree("A")
    out = {
        "tree-inpaint": Task(
            "tree-inpaint",
            tree,
            inverse.Mask(torch.tensor([True, False])),
            torch.tensor([0.3]),
            0.0,
            5.0,
            ref=torch.tensor([0.3, 0.0]),
        ),
        "tree-colorize": Task(
            "tree-colorize", tree, inverse.Grayscale((2,), 0), torch.tensor(0.45), 0.0, 5.0, ref=torch.tensor([0.45, 0.45])
        ),
        "tree-noisy": Task("tree-noisy", tree, inverse.Matrix(torch.tensor([[0.6, 0.8]])), torch.tensor([0.5]), 0.05, 5.0),
    }
    digits = toy.digits_gmm()
    truth = digits.sample(1, generator=torch.Generator().manual_seed(7))[0]
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[..., 2:6, 2:6] = True
    centre = inverse.Mask(~m)  # centre 4x4 missing
    down = inverse.Downsample((1, 8, 8), 2)
    blur = inverse.Blur((1, 8, 8), 3, 1.0)
    y_blur = blur(truth[None])[0] + 0.05 * torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(3))
    out |= {
        "digits-inpaint": Task("digits-inpaint", digits, centre, centre(truth[None])[0], 0.0, 20.0, truth, truth),
        "digits-superres": Task("digits-superres", digits, down, down(truth[None])[0], 0.0, 20.0, truth, truth),
        "digits-deblur": Task("digits-deblur", digits, blur, y_blur, 0.05, 20.0, truth),
    }
    return out


# ---------------------------------------------------------------------------------------------
# Methods: run(denoiser, x, sigmas, task, noise, hp) with the step count chosen for the budget.


def _repaint_steps(budget: int, jl: int = 4, jn: int = 2) -> int:
    """The most steps whose RePaint NFE (n + J (jn - 1) jl) fits the budget."""
    return max(n for n in range(1, budget + 1) if n + len(range(0, n - jl, jl)) * (jn - 1) * jl <= budget)


METHODS = {
    # name: (needs a projection operator (or "mask"), NFE per step, grid of the step-size option or None, run)
    "unconditional": (False, 1, None, lambda D, x, s, t, nz, hp: samplers.euler_ancestral(D, x, s, noise=nz)),
    "repaint (j=1)": (
        True,
        1,
        None,
        lambda D, x, s, t, nz, hp: inverse.repaint(D, x, s, t.op, t.y, jump_length=1, jump_n_sample=1, noise=nz),
    ),
    "repaint (j=4, r=2)": (
        True,
        None,
        None,
        lambda D, x, s, t, nz, hp: inverse.repaint(D, x, s, t.op, t.y, jump_length=4, jump_n_sample=2, noise=nz),
    ),
    "ilvr": (
        True,
        1,
        None,
        lambda D, x, s, t, nz, hp: inverse.ilvr(
            D, x, s, t.ref if t.ref is not None else t.op.pinv(t.y[None])[0], operator=t.op, noise=nz
        ),
    ),
    "score-sde": (True, 2, None, lambda D, x, s, t, nz, hp: inverse.score_sde_impute(D, x, s, t.op, t.y, noise=nz)),
    "steered (projection)": (
        True,
        1,
        None,
        lambda D, x, s, t, nz, hp: inverse.steered(D, x, s, t.op, t.y, mode="projection", noise=nz),
    ),
    "steered (gradient)": (
        False,
        1,
        (0.3, 1.0, 3.0, 10.0),
        lambda D, x, s, t, nz, hp: inverse.steered(D, x, s, t.op, t.y, scale=hp, noise=nz),
    ),
    "dps": (
        False,
        1,
        (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
        lambda D, x, s, t, nz, hp: inverse.dps(D, x, s, t.op, t.y, zeta=hp, noise=nz),
    ),
    "tfg-dps": (
        False,
        1,
        (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
        lambda D, x, s, t, nz, hp: tfg_sample(D, x, s, measurement_objective(t.op, t.y), preset="dps", rho=hp, noise=nz),
    ),
    "tsdiff (mse)": (
        "mask",
        1,
        (1.0, 4.0, 16.0, 64.0, 256.0),
        lambda D, x, s, t, nz, hp: inverse.tsdiff_guided(
            D,
            x,
            s,
            t.op.pinv(t.y[None])[0].reshape(x.shape[1:]),
            t.op.mask.reshape(x.shape[1:]),
            scale=hp,
            guidance="mse",
            noise=nz,
        ),
    ),
    "exact posterior": (False, 1, None, lambda D, x, s, t, nz, hp: samplers.euler_ancestral(t.post, x, s, noise=nz)),
}
BACKWARD = {"steered (gradient)", "dps", "tfg-dps", "tsdiff (mse)"}


def run(task: Task, name: str, n: int, budget: int, seed0: int, hp):
    _, per_step, _, fn = METHODS[name]
    steps = _repaint_steps(budget) if per_step is None else budget // per_step
    sigmas = schedules.karras(steps, 0.002, task.sigma_max)
    noise = SampleNoise(range(seed0, seed0 + n))
    x = noise.randn([task.prior.dim]) * sigmas[0]
    D = inverse.Counting(task.prior)
    t0 = time.time()
    out = fn(D, x, sigmas, task, noise, hp)
    return out, D.nfe, time.time() - t0


def tuning_score(task: Task, name: str, n: int, budget: int, hp) -> float:
    """Minus the sliced Wasserstein distance to exact posterior samples on the tuning seeds (it sees
    consistency and spread alike); -inf if the run diverges (NaN samples)."""
    try:
        x = run(task, name, n, budget, 10_000, hp)[0]
    except GuidelabError:
        return -math.inf
    ref = task.post.sample(2048, generator=torch.Generator().manual_seed(321))
    return -metrics.sliced_wasserstein(ref, x)


def class_of(prior, x: torch.Tensor) -> torch.Tensor:
    """The most probable prior component of each sample (digits: its class)."""
    p = prior.to(torch.float64)
    Sigma = torch.einsum("kij,kj,klj->kil", p.Q, p.L, p.Q)
    comp = torch.distributions.MultivariateNormal(p.mu, covariance_matrix=Sigma)
    logp = comp.log_prob(x.double()[:, None]) + p.log_phi
    return logp.argmax(1)


def score(task: Task, x: torch.Tensor, ref: torch.Tensor) -> dict:
    lp = task.post.logp(task.post.project(x)).double()
    prec, rec = metrics.precision_recall(ref, x, k=3)
    row = {
        "logp": float(lp.mean()),
        "logp_med": float(lp.median()),
        "cons": float(task.post.consistency(x).mean()),
        "sw": metrics.sliced_wasserstein(ref, x),
        "p": prec,
        "r": rec,
    }
    if task.truth is not None:
        row["class"] = float((class_of(task.prior, x) == class_of(task.prior, task.truth[None])).float().mean())
    return row


def table(task: Task, n: int, budget: int, figures: str | None) -> str:
    ref = task.post.sample(4 * n, generator=torch.Generator().manual_seed(123))
    lines = [
        f"### {task.name}: {task.op!r}, noise_std {task.noise_std:g}, budget {budget} NFE, {n} samples",
        "",
        "| method | step size | logp mean | logp median | \\|Ax-y\\| | SW | P | R |"
        + (" class |" if task.truth is not None else "")
        + " NFE | bwd | s |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if task.truth is not None else "") + "---|---|---|",
    ]
    outputs = {}
    for name, (projection, _, grid, _) in METHODS.items():
        if (projection and not task.op.projection) or (projection == "mask" and not isinstance(task.op, inverse.Mask)):
            continue
        hp = None
        if grid:  # tune on separate seeds
            tune_n = max(32, n // 4)
            hp = max(grid, key=lambda h: tuning_score(task, name, tune_n, budget, h))
        try:
            x, nfe, secs = run(task, name, n, budget, 0, hp)
        except GuidelabError as e:  # a step size that diverges
            lines.append(f"| {name} | {'' if hp is None else f'{hp:g}'} | diverged: {e} |")
            continue
        outputs[name] = x
        r = score(task, x, ref)
        cls = f" {r['class']:.2f} |" if "class" in r else ""
        lines.append(
            f"| {name} | {'' if hp is None else f'{hp:g}'} | {r['logp']:.2f} | {r['logp_med']:.2f} | "
            f"{r['cons']:.4f} | {r['sw']:.4f} | {r['p']:.2f} | {r['r']:.2f} |{cls} {nfe} | "
            f"{nfe if name in BACKWARD else 0} | {secs:.1f} |"
        )
        print(f"  {task.name}: {name} done ({secs:.1f} s)", flush=True)
    if figures:
        figure(task, outputs, ref, f"{figures}/{task.name}.png")
    return "\n".join(lines)


def figure(task: Task, outputs: dict, ref: torch.Tensor, path: str) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    names = list(outputs)
    if task.prior.dim == 2:
        fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 2.4), sharex=True, sharey=True)
        for ax, name in zip(axes, names):
            ax.scatter(*ref[:2000].T, s=1, c="0.8")
            ax.scatter(*outputs[name][:512].T, s=1, c="C3")
            ax.set_title(name, fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
    else:
        k = 8
        fig, axes = plt.subplots(len(names) + 1, k, figsize=(k * 0.7, (len(names) + 1) * 0.75))
        rows = [("truth / y", [task.truth, task.op.pinv(task.y[None])[0] if task.op.projection else task.y])]
        rows += [(name, list(outputs[name][:k])) for name in names]
        for r, (name, imgs) in enumerate(rows):
            for c in range(k):
                ax = axes[r, c]
                ax.axis("off")
                if c < len(imgs):
                    ax.imshow(imgs[c].reshape(8, 8).clamp(-1, 1), cmap="gray", vmin=-1, vmax=1)
            axes[r, 0].set_title(name, fontsize=6, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Time series: matplotlib's bundled monthly stock prices (a real series shipped inside a package).

L_WIN, CONTEXT, HORIZON = 36, 24, 12


def stocks() -> list:
    """Monthly log closing prices (1990-2022) of the 10 series in matplotlib's ``sample_data/Stocks.csv``."""
    data = series_data.stocks()
    return list(zip(data.names, data.values))


def windows(series, horizons_back: tuple[int, ...]):
    """Training windows (ending before the first held-out horizon) and the evaluation windows whose
    forecast horizon is the k-th last block of HORIZON months, k in ``horizons_back``."""
    import numpy as np

    train, evals = [], []
    first = max(horizons_back)
    for _, s in series:
        T = len(s)
        train += [s[end - L_WIN : end] for end in range(L_WIN, T - first * HORIZON + 1)]
        evals += [
            s[T - (k - 1) * HORIZON - L_WIN : T - (k - 1) * HORIZON] for k in horizons_back if T - (k - 1) * HORIZON - L_WIN >= 0
        ]
    return torch.tensor(np.stack(train), dtype=torch.float32), torch.tensor(np.stack(evals), dtype=torch.float32)


def centred(w: torch.Tensor) -> torch.Tensor:
    return w - w[:, :CONTEXT].mean(1, keepdim=True)


def train_series_denoiser(X: torch.Tensor, iters: int = 3000):
    """A ToyMLP denoiser of 36-month windows (centred on their context mean), EDM loss, CPU minutes."""
    from guidelab.denoisers import edm_loss
    from guidelab.models.mlp import ToyMLP

    torch.manual_seed(0)
    net = ToyMLP(dim=L_WIN, hidden=256, depth=3, output="denoiser", sigma_data=float(X.std()))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(iters):
        x0 = X[torch.randint(0, len(X), (256,), generator=g)]
        sigma = (torch.randn(256, generator=g) * 1.2 - 1.2).exp()
        loss = edm_loss(net, x0 + sigma[:, None] * torch.randn(x0.shape, generator=g), sigma, x0, net.precond).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    return net


crps = series_data.crps  # sample CRPS per time step: samples [S, H], y [H] -> [H]


FORECASTERS = {
    # name: (option grid or None, run(denoiser, x, sigmas, window, mask, noise, S, hp) -> [S, L])
    "context mean only (unguided)": (None, lambda D, x, s, z, m, nz, S, hp: samplers.euler_ancestral(D, x, s, noise=nz)),
    "tsdiff mse": (
        (0.25, 1.0, 4.0),
        lambda D, x, s, z, m, nz, S, hp: inverse.tsdiff_guided(D, x, s, z, m, scale=hp, guidance="mse", noise=nz),
    ),
    "tsdiff quantile": (
        (0.25, 1.0, 4.0),
        lambda D, x, s, z, m, nz, S, hp: inverse.tsdiff_guided(
            D, x, s, z, m, scale=hp, guidance="quantile", q=inverse.quantile_levels(S), noise=nz
        ),
    ),
    "tsdiff refine lmc (seasonal naive)": (
        None,
        lambda D, x, s, z, m, nz, S, hp: inverse.tsdiff_refine(D, _snaive(z).expand(S, -1), z, m, noise=nz),
    ),
    "repaint (j=1)": (
        None,
        lambda D, x, s, z, m, nz, S, hp: inverse.repaint(
            D, x, s, inverse.Mask(m), z[m], jump_length=1, jump_n_sample=1, noise=nz
        ),
    ),
    "repaint (j=4, r=2)": (
        None,
        lambda D, x, s, z, m, nz, S, hp: inverse.repaint(
            D, x, s, inverse.Mask(m), z[m], jump_length=4, jump_n_sample=2, noise=nz
        ),
    ),
    "dps": ((0.03, 0.1, 0.3), lambda D, x, s, z, m, nz, S, hp: inverse.dps(D, x, s, inverse.Mask(m), z[m], zeta=hp, noise=nz)),
}


def _safe(forecasts, scores, name, W, hp) -> float:
    """NCRPS of one option on the validation windows; inf if the run diverges."""
    try:
        v = scores(forecasts(name, W, hp), W)[0]
    except GuidelabError:
        return math.inf
    return v if math.isfinite(v) else math.inf


def _snaive(z: torch.Tensor) -> torch.Tensor:
    out = z.clone()
    out[CONTEXT:] = z[CONTEXT - 12 : CONTEXT - 12 + HORIZON]
    return out


def forecast_table(S: int = 64, steps: int = 64) -> str:
    series = stocks()
    X, test = windows(series, (3, 2, 1))
    _, val = windows(series, (4,))
    net = train_series_denoiser(centred(X))
    mask = torch.arange(L_WIN) < CONTEXT
    sigmas = schedules.karras(steps, 0.002, 20.0)

    def forecasts(name, W, hp):
        fn = FORECASTERS[name][1]
        Z = centred(W)
        out = []
        for i in range(len(W)):
            noise = SampleNoise(range(1000 * i, 1000 * i + S))
            out.append(fn(net, noise.randn([L_WIN]) * sigmas[0], sigmas, Z[i], mask, noise, S, hp))
        return torch.stack(out) + W[:, :CONTEXT].mean(1)[:, None, None]  # log prices [N, S, L]

    def scores(F, W):
        P, Y = F.exp()[..., CONTEXT:], W.exp()[:, CONTEXT:]
        nc = float(sum(crps(P[i], Y[i]).sum() for i in range(len(W))) / Y.abs().sum())
        nmse = float((P.mean(1) - Y).square().mean() / Y.square().mean())
        return nc, nmse

    rows = []
    for name, W in (("seasonal naive", test), ("naive (last value)", test)):
        Z = W.clone()
        Z[:, CONTEXT:] = (
            W[:, CONTEXT - 12 : CONTEXT - 12 + HORIZON] if name.startswith("seasonal") else W[:, CONTEXT - 1 : CONTEXT]
        )
        rows.append((name, "", *scores(Z[:, None], W)))
    for name, (grid, _) in FORECASTERS.items():
        hp = min(grid, key=lambda h, name=name: _safe(forecasts, scores, name, val, h)) if grid else None
        rows.append((name, "" if hp is None else f"{hp:g}", *scores(forecasts(name, test, hp), test)))
        print(f"  stocks: {name} done", flush=True)
    title = f"### stocks-forecast: {len(test)} held-out 12-month horizons (10 series, last 3 years), {S} samples, {steps} steps"
    lines = [title, "", "| method | scale (picked on the year before) | NCRPS | NMSE of the mean |", "|---|---|---|---|"]
    lines += [f"| {n} | {h} | {c:.4f} | {m:.5f} |" for n, h, c, m in rows]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join([*tasks(), "stocks-forecast"]))
    p.add_argument("--n", type=int, default=512, help="samples per method (digits tasks use n // 4)")
    p.add_argument("--budget", type=int, default=32, help="denoiser evaluations per sample")
    p.add_argument("--figures", default=None, help="folder for one figure per task")
    a = p.parse_args()
    torch.set_num_threads(1)
    all_tasks = tasks()
    for name in a.tasks.split(","):
        if name == "stocks-forecast":
            print(forecast_table(), flush=True)
            continue
        task = all_tasks[name]
        n = a.n if task.prior.dim == 2 else max(32, a.n // 4)
        print(table(task, n, a.budget, a.figures), flush=True)
        print()


if __name__ == "__main__":
    main()
