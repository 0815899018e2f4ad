"""Guide a toy world: autoguide a small denoiser with a smaller, shorter-trained one and compare the
exact log-density of the samples at w = 1 (no guidance) and w = 2.

    python examples/guide_toy.py [--iters 4096] [--out runs/examples/toy]
"""

from __future__ import annotations

import argparse

import torch

from guidelab import guidance, samplers, schedules, toy
from guidelab.training import load_model, train_toy


def main(argv=None) -> dict[float, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--out", default="runs/examples/toy")
    a = ap.parse_args(argv)
    net = load_model(train_toy(a.out, classes="A", hidden=64, iters=a.iters))
    guide = load_model(train_toy(a.out, classes="A", hidden=32, iters=max(1, a.iters // 8)))
    world, sigmas = toy.tree("A"), schedules.karras(32, 0.002, 5.0)
    result = {}
    for w in (1.0, 2.0):
        torch.manual_seed(0)
        x = samplers.heun(guidance.autoguidance(net, guide, w=w), world.sample(a.samples, sigma=5.0), sigmas)
        result[w] = float(world.logp(x).mean())
        print(f"w={w}: mean exact log p = {result[w]:.3f}")
    return result


if __name__ == "__main__":
    main()
