"""Quality of a digits run's EMA snapshots: class accuracy and Fréchet distance in the digits
classifier's feature space (against the held-out test split), for conditional unguided samples.

    python bench/digits_quality.py RUN_DIR [--sigma-rel 0.1] [--samples-per-class 100] [--steps 32]
    python bench/digits_quality.py RUN_DIR --only-step 16384 --guide 2048:0.05 --weights 1,1.5,2
    python bench/digits_quality.py GFT_RUN_DIR --weights 1,2,3     # a recipe="gft" run: beta = 1/w

``--guide STEP:SIGMA_REL``: autoguidance with a post-hoc EMA of an earlier point of the same run as
the guide (the main model is the snapshot step's post-hoc EMA of ``--sigma-rel``).

The classifier (models.digits, 2000 steps, seed 0) is trained once and cached as
runs/digits_classifier.safetensors. Reference floor: the train split against the test split.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from guidelab.data import digits
from guidelab.guidance import autoguidance
from guidelab.metrics.frechet import FeatureStats, fid_from_stats
from guidelab.models.digits import train_digits_classifier
from guidelab.rng import SampleNoise
from guidelab.samplers import heun
from guidelab.schedules import karras
from guidelab.training import load_model, save_model
from guidelab.training.gft import gft_denoiser
from guidelab.training.phema import reconstruct, snapshots


def classifier(path=Path("runs/digits_classifier.safetensors")):
    if path.exists():
        return load_model(path)
    clf = train_digits_classifier(steps=2000)
    save_model(path, clf, recipe="digits-classifier", steps=2000, seed=0)
    return clf


def stats(f):
    return FeatureStats(f.shape[1]).update(f)


@torch.no_grad()
def samples(model, per_class: int, steps: int, seed: int = 0):
    n = 10 * per_class
    noise = SampleNoise(list(range(seed, seed + n)))
    sigmas = karras(steps, 0.002, 80.0).float()
    labels = torch.arange(n) // per_class
    x = noise.randn((1, 8, 8)) * sigmas[0]
    return heun(model, x, sigmas, cond={"label": labels}).clamp(-1, 1), labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--sigma-rel", type=float, default=0.10)
    ap.add_argument("--samples-per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--only-step", type=int, default=None)
    ap.add_argument("--guide", default=None, help="STEP:SIGMA_REL of the autoguidance guide")
    ap.add_argument("--weights", default="1", help="guidance weights with --guide, or of a GFT run")
    ap.add_argument("--seed", type=int, default=0, help="first sample seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    clf = classifier()
    ex = clf.extractor()
    test = digits("test")
    ref = stats(ex(test.images))
    acc_test = (clf(test.images).argmax(1) == test.labels).float().mean().item()
    print(f"classifier test accuracy {acc_test:.3f}; FD(train split, test split) {fid_from_stats(stats(ex(digits('train').images)), ref):.2f}")
    steps = sorted({s for _, s, _ in snapshots(args.run_dir)})
    if args.only_step:
        steps = [args.only_step]
    for step in steps:
        t = time.time()
        model = reconstruct(args.run_dir, args.sigma_rel, step)
        guide = None
        if args.guide:
            g_step, g_rel = args.guide.split(":")
            guide = reconstruct(args.run_dir, float(g_rel), int(g_step))
        for w in [float(v) for v in args.weights.split(",")]:
            den = model if guide is None else autoguidance(model, guide, w=w)
            if getattr(model, "extra_scalar", None) == "beta":  # a GFT run: one pass at beta = 1/w
                den = gft_denoiser(model, w)
            x, labels = samples(den, args.samples_per_class, args.steps, args.seed)
            acc = (clf(x).argmax(1) == labels).float().mean().item()
            fd = fid_from_stats(stats(ex(x)), ref)
            what = f"autoguidance w={w:g} guide {args.guide}" if guide is not None else "no guidance"
            what = f"GFT w={w:g}" if getattr(model, "extra_scalar", None) == "beta" else what
            print(f"step {step:6d}  sigma_rel {args.sigma_rel:.3f} (post-hoc error {model.checkpoint_info['phema_error']:.1e})  "
                  f"{what}  class accuracy {acc:.3f}  FD {fd:.2f}  ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
