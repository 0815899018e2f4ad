"""TSG on undertrained unconditional ToyMLPs: the numbers of docs/GUIDANCE.md (TSG section).

    python bench/tsg_sweep.py                  # 3 training seeds x 3 sample seeds, 2048 samples (~5 min, 1 thread)
    python bench/tsg_sweep.py --n 1024 --seeds 2
    python bench/tsg_sweep.py --output energy  # the autoguidance paper's energy-output ToyMLP (score loss)

Models: ToyMLP(hidden 32, depth 3, denoiser output) trained 300 iterations (batch 512) on the exact
tree world, classes A and B (an unconditional model). Sampler: EDM Heun, karras(32, 0.002, 5), start
from exact samples of p_AB(x; 5). Quality: mean exact log p of the samples, k-NN precision / recall
against 4096 exact samples. Each row: mean over all (training seed, sample seed) pairs, and the range
of the paired difference to the unguided model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from guidelab import guidance as G
from guidelab import metrics, samplers, schedules, toy
from guidelab.guidance._base import Branch, Guided, PerCall, draw_normal
from guidelab.training import load_model, train_toy

SIG = schedules.karras(32, 0.002, 5.0, dtype=torch.float32)


def one_sided(net, w, s):
    """Not TSG: the scalar c_noise moved *up* by s |n| (the reference sees a higher noise level)."""
    zero = PerCall(lambda _, x, sigma: x.new_zeros(x.shape[0]))
    up = PerCall(lambda _, x, sigma: s * draw_normal(None, sigma, (), 0x75C, x).abs())
    return Guided(Branch(net, {"noise_embed_offset": zero}), Branch(net, {"noise_embed_offset": up}), w, "one-sided")


CONFIGS = {
    "unguided": lambda net: net,
    "TSG vector, s 0.3, alpha 0, w 3": lambda net: G.tsg(net, 3.0, s=0.3, alpha=0.0, dim=net.hidden),
    "TSG vector, s 0.3, alpha 0, w 2": lambda net: G.tsg(net, 2.0, s=0.3, alpha=0.0, dim=net.hidden),
    "TSG vector, s 0.5, alpha 0, w 2": lambda net: G.tsg(net, 2.0, s=0.5, alpha=0.0, dim=net.hidden),
    "TSG vector, s 1, alpha 1, w 3": lambda net: G.tsg(net, 3.0, s=1.0, alpha=1.0, dim=net.hidden),
    "TSG scalar, s 0.3, alpha 0, w 2": lambda net: G.tsg(net, 2.0, s=0.3, alpha=0.0, form="scalar"),
    "TSG scalar, s 1, alpha 0, w 2": lambda net: G.tsg(net, 2.0, s=1.0, alpha=0.0, form="scalar"),
    "TSG scalar, s 0.3, alpha 1, w 2": lambda net: G.tsg(net, 2.0, s=0.3, alpha=1.0, form="scalar"),
    "(not TSG) scalar one-sided s abs(n), s 0.3, w 2": lambda net: one_sided(net, 2.0, 0.3),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--seeds", type=int, default=3, help="training seeds and sample seeds (each)")
    ap.add_argument("--output", choices=["denoiser", "energy"], default="denoiser", help="ToyMLP output")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = toy.tree("AB")
    ref = world.sample(4096, 0.0, generator=torch.Generator().manual_seed(99))
    res = {k: [] for k in CONFIGS}
    tmp = tempfile.mkdtemp(prefix="guidelab-tsg-")
    for tseed in range(args.seeds):
        net = load_model(
            train_toy(
                tmp,
                classes="AB",
                hidden=32,
                depth=3,
                output=args.output,
                loss="edm" if args.output == "denoiser" else "score",
                iters=300,
                batch=512,
                snapshot_every=100,
                progress=False,
                threads=1,
                seed=tseed,
            )
        )
        for sseed in range(1, args.seeds + 1):
            x = world.sample(args.n, 5.0, generator=torch.Generator().manual_seed(sseed))
            for name, make in CONFIGS.items():
                with torch.no_grad():
                    out = samplers.heun(make(net), x, SIG)
                res[name].append((metrics.mean_logp(world, out), *metrics.precision_recall(ref, out)))
            print(f"training seed {tseed}, sample seed {sseed} done", flush=True)
    base = res["unguided"]
    print("\n| setting | mean log p | precision | recall | Δ log p (range) | Δ precision (range) | Δ recall (range) |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in res.items():
        mean = [statistics.mean(r[j] for r in rows) for j in range(3)]
        d = [[r[j] - b[j] for r, b in zip(rows, base)] for j in range(3)]
        rng = [f"{min(v):+.2f} … {max(v):+.2f}" if j == 0 else f"{min(v):+.3f} … {max(v):+.3f}" for j, v in enumerate(d)]
        print(f"| {name} | {mean[0]:.2f} | {mean[1]:.3f} | {mean[2]:.3f} | " + " | ".join(rng) + " |")


if __name__ == "__main__":
    main()
