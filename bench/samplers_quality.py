"""Quality per NFE: distance of each sampler's samples to the exact distribution on the exact world.

    python bench/samplers_quality.py            # -> bench/out/samplers_quality.{md,json,png}
    python bench/samplers_quality.py --n 4096 --plot docs/img/samplers_quality.png

World: the autoguidance tree, class A (guidelab.toy.tree, float64), exact denoiser. Start: exact
samples of p(x; sigma_max) (as in the paper's toy example), Karras schedule (rho = 7, sigma in
[0.002, 5]). For each NFE budget (5, 10, 20, 50) a sampler gets the most steps whose network
evaluations fit in the budget (counted, not assumed). Distance: sliced 2-Wasserstein to three
independent exact sample sets (mean); "exact" is the same distance between the exact sets themselves,
the floor that finite samples allow. Stochastic samplers use per-sample seeds.

dpm_solver_v3 runs with the world's EMS (``samplers.world_ems``: ``--ems-samples`` exact samples,
``--ems-steps`` lambda intervals over the same sigma range, computed once) and, as the row
``dpm_solver_v3 (l=1,s=0,b=0)``, with the degenerate statistics (DPM-Solver++ multistep)::

    python bench/samplers_quality.py --only dpm_solver_v3,dpmpp_2m,unipc --budgets 5,10,20   # the SAMPLERS.md table

``--digits MODEL`` (a digits checkpoint with its ``guidelab ems`` file next to it) does the same on
digits: 1,000 class-balanced samples per cell (``app.evaluate``: Fréchet distance in the digits
classifier's features against the test split, class accuracy), no guidance, sigma in [0.002, 80]::

    guidelab ems MODEL && python bench/samplers_quality.py --digits MODEL --budgets 5,10,20
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


def options(name: str, ems=None) -> dict:
    """Keywords a sampler needs: dpm_solver_v3 its statistics (degenerate ones for counting NFE)."""
    return {"ems": ems if ems is not None else samplers.EMS.degenerate()} if name == "dpm_solver_v3" else {}


def nfe_of(name: str, steps: int) -> int:
    """NFE of ``steps`` steps, counted on a 1-point run."""
    D = Counted(lambda x, s: x / (1 + s[:, None] ** 2))
    samplers.get(name)(
        D,
        torch.zeros(1, 2, dtype=torch.float64),
        schedules.karras(steps, SIGMA_MIN, SIGMA_MAX),
        noise=SampleNoise([0]),
        **options(name),
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
    ap.add_argument("--only", default=None, help="comma-separated sampler names (default: all)")
    ap.add_argument("--budgets", default=None, help="comma-separated NFE budgets (default: 5,10,20,50)")
    ap.add_argument("--ems-samples", type=int, default=1024, help="dpm_solver_v3: exact samples for the EMS")
    ap.add_argument("--ems-steps", type=int, default=32, help="dpm_solver_v3: lambda intervals of the EMS")
    ap.add_argument("--digits", default=None, help="a digits checkpoint (its EMS file next to it): the digits table")
    args = ap.parse_args()
    global BUDGETS
    if args.budgets:
        BUDGETS = tuple(int(b) for b in args.budgets.split(","))
    if args.digits:
        digits_table(args.digits, pathlib.Path(args.out))
        return
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
    names = args.only.split(",") if args.only else samplers.names()
    ems = None
    if "dpm_solver_v3" in names:
        ems = samplers.world_ems(world, SIGMA_MIN, SIGMA_MAX, n=args.ems_samples, steps=args.ems_steps, seed=5)
        print(f"EMS of the world: {ems} from {args.ems_samples} exact samples ({time.time() - t0:.0f} s)", flush=True)
    runs = [(name, name, options(name, ems)) for name in names]
    if "dpm_solver_v3" in names:
        runs.append(("dpm_solver_v3 (l=1,s=0,b=0)", "dpm_solver_v3", options("dpm_solver_v3")))
    for label, name, kw in runs:
        rows[label] = {}
        for budget in BUDGETS:
            steps = steps_for(name, budget)
            D = Counted(world)
            sigmas = schedules.karras(steps, SIGMA_MIN, SIGMA_MAX)
            y = samplers.get(name)(D, x_T.clone(), sigmas, noise=SampleNoise(seeds), **kw)
            dist = sum(sliced_wasserstein(y, e) for e in exact) / 3
            rows[label][budget] = {"steps": steps, "nfe": D.nfe, "sw": dist}
        print(
            label, "  ".join(f"NFE {b}: {rows[label][b]['sw']:.4f}" for b in BUDGETS), f"({time.time() - t0:.0f} s)", flush=True
        )

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samplers_quality.json").write_text(json.dumps({"n": args.n, "floor": floor, "rows": rows}, indent=1))
    lines = ["| sampler | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " |", "|---|" + "---:|" * len(BUDGETS)]
    for name, r in sorted(rows.items(), key=lambda kv: kv[1][BUDGETS[min(1, len(BUDGETS) - 1)]]["sw"]):
        lines.append(f"| {name} | " + " | ".join(f"{r[b]['sw']:.4f} ({r[b]['steps']} st)" for b in BUDGETS) + " |")
    lines.append("| *exact vs exact* | " + " | ".join(f"{floor:.4f}" for _ in BUDGETS) + " |")
    table = "\n".join(lines)
    (out / "samplers_quality.md").write_text(table + "\n")
    print(table)

    plot(rows, floor, args.n, [out / "samplers_quality.png"] + ([pathlib.Path(args.plot)] if args.plot else []))
    print(f"wrote {out}/samplers_quality.{{md,json,png}}" + (f" and {args.plot}" if args.plot else ""))


def digits_table(model: str, out: pathlib.Path) -> None:
    """FD / class accuracy per NFE budget of dpm_solver_v3 (the model's EMS, and degenerate), dpmpp_2m, unipc."""
    from guidelab.app import jobs
    from guidelab.app.commands.ems import default_out
    from guidelab.app.evaluate import DigitsMetrics, evaluate

    ems = str(default_out(model))
    samplers.EMS.load(ems)  # a clear error if it is missing
    measure = DigitsMetrics(None)
    runs = [
        ("dpm_solver_v3", "dpm_solver_v3", {"ems": ems}),
        ("dpm_solver_v3 (l=1,s=0,b=0)", "dpm_solver_v3", {"ems": "degenerate"}),
        ("dpmpp_2m", "dpmpp_2m", {}),
        ("unipc", "unipc", {}),
    ]
    rows: dict = {}
    t0 = time.time()
    for label, name, kw in runs:
        rows[label] = {}
        for budget in BUDGETS:
            steps = steps_for(name, budget)
            cfg = jobs.SampleConfig(world=None, model=model, sampler=name, steps=steps, sampler_options=kw)
            cell = out / "digits" / f"{label.split(' ')[0]}{'-degenerate' if 'l=1' in label else ''}-{budget}"
            m = evaluate(cell, cfg, n=1000, measure=measure)
            rows[label][budget] = {"steps": steps, "fd": m["fd"], "accuracy": m["class_accuracy"]}
        print(
            label,
            "  ".join(f"NFE {b}: FD {rows[label][b]['fd']:.2f}" for b in BUDGETS),
            f"({time.time() - t0:.0f} s)",
            flush=True,
        )
    (out / "samplers_quality_digits.json").write_text(json.dumps({"model": model, "rows": rows}, indent=1))
    lines = ["| sampler | " + " | ".join(f"NFE {b}: FD / acc." for b in BUDGETS) + " |", "|---|" + "---:|" * len(BUDGETS)]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{r[b]['fd']:.1f} / {100 * r[b]['accuracy']:.1f} %" for b in BUDGETS) + " |")
    table = "\n".join(lines)
    (out / "samplers_quality_digits.md").write_text(table + "\n")
    print(table)


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
            label=name + (" (stoch.)" if samplers.info(name.split(" ")[0]).stochastic else ""),
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
