"""Quality per NFE: distance of each sampler's samples to the exact distribution on the exact world.

    python bench/samplers_quality.py            # -> bench/out/samplers_quality.{md,json,png}
    python bench/samplers_quality.py --n 4096 --plot docs/img/samplers_quality.png

World: the autoguidance tree, class A (guidelab.toy.tree, float64), exact denoiser. Start: exact
samples of p(x; sigma_max) (as in the paper's toy example), Karras schedule (rho = 7, sigma in
[0.002, 5]). For each NFE budget (5, 10, 20, 50) a sampler gets the most steps whose network
evaluations fit in the budget (counted, not assumed). Distance: sliced 2-Wasserstein to three
independent exact sample sets (mean); "exact" is the same distance between the exact sets themselves,
the floor that finite samples allow. Stochastic samplers use per-sample seeds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from guidelab import samplers, schedules, toy
from guidelab.metrics import sliced_wasserstein
from guidelab.rng import SampleNoise

BUDGETS = (5, 10, 20, 50)
SIGMA_MIN, SIGMA_MAX = 0.002, 5.0


class Counted:
    """The exact denoiser, counting network evaluations."""

    def __init__(self, world):
        self.world, self.nfe = world, 0

    def __call__(self, x, sigma):
        self.nfe += 1
        return self.world(x, sigma)


def nfe_of(name: str, steps: int) -> int:
    """NFE of ``steps`` steps, counted on a 1-point run."""
    D = Counted(lambda x, s: x / (1 + s[:, None] ** 2))
    samplers.get(name)(
        D, torch.zeros(1, 2, dtype=torch.float64), schedules.karras(steps, SIGMA_MIN, SIGMA_MAX), noise=SampleNoise([0])
    )
    return D.nfe


def steps_for(name: str, budget: int) -> int:
    return max((s for s in range(1, budget + 1) if nfe_of(name, s) <= budget), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2048, help="samples per run")
    ap.add_argument("--out", default="bench/out", help="folder for the table, JSON and plot")
    ap.add_argument("--plot", default=None, help="also write the plot here (e.g. docs/img/samplers_quality.png)")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from the saved JSON")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads((pathlib.Path(args.out) / "samplers_quality.json").read_text())
        plot(
            saved["rows"],
            saved["floor"],
            saved["n"],
            [pathlib.Path(args.out) / "samplers_quality.png"] + ([pathlib.Path(args.plot)] if args.plot else []),
        )
        return
    torch.set_num_threads(1)  # the exact world is many tiny matmuls: threads only spin
    world = toy.tree("A", dtype=torch.float64)
    exact = [world.sample(args.n, 0.0, torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    floor = sum(sliced_wasserstein(a, b) for a, b in [(exact[0], exact[1]), (exact[0], exact[2]), (exact[1], exact[2])]) / 3
    x_T = world.sample(args.n, SIGMA_MAX, torch.Generator().manual_seed(4))
    seeds = list(range(args.n))
    rows, t0 = {}, time.time()
    for name in samplers.names():
        rows[name] = {}
        for budget in BUDGETS:
            steps = steps_for(name, budget)
            D = Counted(world)
            y = samplers.get(name)(D, x_T.clone(), schedules.karras(steps, SIGMA_MIN, SIGMA_MAX), noise=SampleNoise(seeds))
            dist = sum(sliced_wasserstein(y, e) for e in exact) / 3
            rows[name][budget] = {"steps": steps, "nfe": D.nfe, "sw": dist}
        print(name, "  ".join(f"NFE {b}: {rows[name][b]['sw']:.4f}" for b in BUDGETS), f"({time.time() - t0:.0f} s)", flush=True)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samplers_quality.json").write_text(json.dumps({"n": args.n, "floor": floor, "rows": rows}, indent=1))
    lines = ["| sampler | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " |", "|---|" + "---:|" * len(BUDGETS)]
    for name, r in sorted(rows.items(), key=lambda kv: kv[1][BUDGETS[1]]["sw"]):
        lines.append(f"| {name} | " + " | ".join(f"{r[b]['sw']:.4f} ({r[b]['steps']} st)" for b in BUDGETS) + " |")
    lines.append(f"| *exact vs exact* | {floor:.4f} | {floor:.4f} | {floor:.4f} | {floor:.4f} |")
    table = "\n".join(lines)
    (out / "samplers_quality.md").write_text(table + "\n")
    print(table)

    plot(rows, floor, args.n, [out / "samplers_quality.png"] + ([pathlib.Path(args.plot)] if args.plot else []))
    print(f"wrote {out}/samplers_quality.{{md,json,png}}" + (f" and {args.plot}" if args.plot else ""))


def plot(rows: dict, floor: float, n: int, paths: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles, colors = ["-", "--", ":", "-."], plt.cm.tab20.colors
    for k, (name, r) in enumerate(sorted(rows.items())):
        budgets = sorted(int(b) for b in r)
        ax.plot(
            budgets,
            [r[b if b in r else str(b)]["sw"] for b in budgets],
            styles[k % 4],
            color=colors[k % 20],
            marker="o",
            ms=3,
            label=name + (" (stoch.)" if samplers.info(name).stochastic else ""),
        )
    ax.axhline(floor, color="k", lw=0.8, label="exact vs exact")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="NFE",
        ylabel="sliced W2 to exact samples",
        title=f"Tree world (class A), Karras schedule, {n} samples",
    )
    ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
