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


# Guidance zoo II (issue 16): post-CFG rules and weight schedules. FDG, Perp-Neg and CADS need worlds
# the tree cannot give (signals with frequency bands; three classes, so that a negative can leave the
# positive line; a float condition): small exact Gaussian worlds below, each with its own reference.


def _gauss_denoise(x, sigma, mu, var, logits):
    """Exact D(x; sigma) of sum_k softmax(logits)_k N(mu_k, var I), per row; x [B, D], logits [B, K]."""
    s2 = var + sigma.reshape(-1, 1, 1).double() ** 2  # [B, 1, 1]
    d = x.double()[:, None, :] - mu[None]  # [B, K, D]
    logr = logits.double() - 0.5 * (d**2).sum(-1) / s2[..., 0] - 0.5 * mu.shape[1] * torch.log(s2[..., 0])
    r = torch.softmax(logr, 1)[..., None]
    Dk = mu[None] + (var / s2) * d
    return (r * Dk).sum(1).to(x.dtype)


class ThreeClasses:
    """Three isotropic Gaussian classes in 2-D (label 3 = null: the equal mixture); ``emb`` [B, 3] (float
    logits of the class weights) replaces an integer label when given (CADS anneals it)."""

    MU = torch.tensor([[0.0, 0.9], [-0.7, 0.0], [0.7, 0.0]], dtype=torch.float64)
    VAR = 0.3**2
    condition = G.Condition("label", {"label": 3}, 3)

    def __call__(self, x, sigma, label=None, emb=None):
        lab = torch.full((x.shape[0],), 3) if label is None else label
        logits = torch.nn.functional.one_hot(lab.long(), 4)[:, :3].double() * 12.0  # null: all zero, equal
        if emb is not None:
            logits = torch.where((lab == 3)[:, None], logits, emb.double())
        return _gauss_denoise(x, sigma, self.MU, self.VAR, logits)

    def sample(self, k, n, seed):
        g = torch.Generator().manual_seed(seed)
        return self.MU[k].float() + 0.3 * torch.randn(n, 2, generator=g)


THREE = ThreeClasses()


def _three_heun(d, n, cond):
    x0 = 5.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return samplers.heun(d, x0, SIG, cond=cond)


def perp_neg(n):
    lab = {"label": torch.zeros(n, dtype=torch.long)}
    panels = [
        ("CFG w = 3 (class top)", _three_heun(G.cfg(THREE, 3.0), n, lab)),
        ("Perp-Neg w = 3, negative left, neg_w = 0.1", _three_heun(G.perp_neg(G.cfg(THREE, 3.0), {"label": 1}, 0.1), n, lab)),
        ("Perp-Neg w = 3, negative left, neg_w = 0.3", _three_heun(G.perp_neg(G.cfg(THREE, 3.0), {"label": 1}, 0.3), n, lab)),
    ]
    return panels, {"ref": THREE.sample(0, n, 1), "refb": torch.cat([THREE.sample(1, n // 2, 2), THREE.sample(2, n // 2, 3)])}


def cads(n):
    emb = torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), 3).double() * 12.0
    cond = {"label": torch.zeros(n, dtype=torch.long), "emb": emb}
    seeds = list(range(n))

    def run(g):
        return _three_heun(g, n, cond)

    panels = [
        ("CFG w = 6", run(G.cfg(THREE, 6.0))),
        ("CADS CFG w = 6 (paper defaults)", run(G.cads(G.cfg(THREE, 6.0), key="emb", noise_scale=0.25, seeds=seeds))),
        (
            "CADS w = 6, tau 0.3-0.6, s = 1",
            run(G.cads(G.cfg(THREE, 6.0), key="emb", tau1=0.3, tau2=0.6, noise_scale=1.0, seeds=seeds)),
        ),
    ]
    return panels, {"ref": THREE.sample(0, n, 1), "refb": torch.cat([THREE.sample(1, n // 2, 2), THREE.sample(2, n // 2, 3)])}


class Signals:
    """Exact world of 16-sample signals [B, 1, 16]: class 0 = offset +0.1 and the alternating pattern
    +0.1, class 1 = offset -0.1 and pattern -0.1 (label 2 = null: both), each with a spread of offsets
    (low band) and of pattern amplitude (high band), so that the classes overlap."""

    ONE, ALT = torch.ones(16, dtype=torch.float64), torch.tensor([1.0, -1.0] * 8, dtype=torch.float64)
    condition = G.Condition("label", {"label": 2}, 2)

    def __init__(self):
        # offset m and pattern a on a 5 x 5 grid per class (a mixture of 25 isotropic Gaussians each)
        grid = torch.linspace(-0.2, 0.2, 5, dtype=torch.float64)
        m, a = torch.meshgrid(grid, grid, indexing="ij")
        self.mu = torch.stack(
            [(sgn * 0.1 + m.flatten())[:, None] * self.ONE + (sgn * 0.1 + a.flatten())[:, None] * self.ALT for sgn in (1, -1)]
        )  # [2, 25, 16]: sample i of a signal = m + a (-1)^i
        self.var = 0.04**2

    def __call__(self, x, sigma, label=None):
        lab = torch.full((x.shape[0],), 2) if label is None else label
        mu = self.mu.reshape(50, 16)
        logits = torch.zeros(x.shape[0], 50, dtype=torch.float64)
        logits[lab == 0, 25:] = -float("inf")
        logits[lab == 1, :25] = -float("inf")
        return _gauss_denoise(x.reshape(-1, 16), sigma, mu, self.var, logits).reshape(x.shape)

    @staticmethod
    def coords(x):
        """(offset, pattern amplitude) of signals [B, 1, 16]: the low and the high band."""
        y = x.reshape(-1, 16).double()
        return torch.stack([y.mean(1), (y * torch.tensor([1.0, -1.0] * 8, dtype=torch.float64)).mean(1)], 1).float()


def fdg(n):
    world = Signals()
    lab = {"label": torch.zeros(n, dtype=torch.long)}
    x0 = 5.0 * torch.randn(n, 1, 16, generator=torch.Generator().manual_seed(0))

    def run(g):
        with torch.no_grad():
            return Signals.coords(samplers.heun(g, x0, SIG, cond=lab))

    def exact(k, m, seed):
        g = torch.Generator().manual_seed(seed)
        mu = world.mu[k][torch.randint(25, (m,), generator=g)].float()
        return Signals.coords((mu + 0.04 * torch.randn(mu.shape, generator=g))[:, None])

    ref, refb = exact(0, n, 1), exact(1, n // 2, 2)
    panels = [
        ("CFG w = 4", run(G.cfg(world, 4.0))),
        ("FDG w = 4, w_low = 1", run(G.fdg(G.cfg(world, 4.0), 1.0))),
        ("FDG w = 4, w_low = 2", run(G.fdg(G.cfg(world, 4.0), 2.0))),
    ]
    return panels, {"ref": ref, "refb": refb, "lim": (-0.5, 0.7), "labels": ("offset (low band)", "pattern (high band)")}


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


ENTRIES.update({f.__name__: f for f in (tcfg, cfg_norm, mag, dynamic_thresholding, weight_schedule, fdg, perp_neg, cads)})


def draw(name: str, panels, n: int, ref=None, refb=None, lim=(-1.3, 1.9), labels=None) -> pathlib.Path:
    """``ref`` / ``refb``: the target class's exact samples (P/R against them) and the others' (default: the
    tree's A and B); ``lim``: both axes' range; ``labels``: axis names (default none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ref is None:
        ref = toy.tree("A").sample(n, 0.0, generator=torch.Generator().manual_seed(1))
        refb = toy.tree("B").sample(n // 2, 0.0, generator=torch.Generator().manual_seed(2))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, x) in zip(axes[0], panels):
        p, r = metrics.precision_recall(ref, x)
        ax.scatter(*refb.T, s=1, c="0.88", lw=0)
        ax.scatter(*ref.T, s=1, c="0.6", lw=0)
        ax.scatter(*x.T, s=1.5, c="tab:orange", lw=0)
        ax.set_title(f"{title}\nP {p:.2f}  R {r:.2f}", fontsize=8)
        ax.set_xlim(*lim)
        ax.set_ylim(*lim)
        ax.set_xticks([])
        ax.set_yticks([])
        if labels:
            ax.set_xlabel(labels[0], fontsize=7)
            ax.set_ylabel(labels[1], fontsize=7)
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
        out = ENTRIES[name](args.n)
        panels, kw = out if isinstance(out, tuple) else (out, {})
        path = draw(name, panels, args.n, **kw)
        print(f"{name}: {path} ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
