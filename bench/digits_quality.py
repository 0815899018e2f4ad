"""Quality of a digits run per EMA snapshot step: a loop over :func:`guidelab.app.evaluate.evaluate`
(class accuracy, Fréchet distance, precision / recall, NFE in the digits-classifier feature space
against the test split) at each snapshot step's post-hoc EMA.

    python bench/digits_quality.py RUN_DIR [--sigma-rel 0.1] [--samples 1000] [--out runs/bench/quality]

One step, any guider: use ``guidelab evaluate RUN_DIR --step N ...`` directly (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from guidelab.app.evaluate import DigitsMetrics, evaluate
from guidelab.app.jobs import SampleConfig
from guidelab.training.phema import snapshots


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--sigma-rel", type=float, default=0.10)
    ap.add_argument("--samples", type=int, default=1000, help="samples per step (balanced labels, seeds 0..)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/digits_quality"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    measure = DigitsMetrics()
    print(f"reference: {measure.floor}")
    for step in sorted({s for _, s, _ in snapshots(args.run_dir)}):
        cfg = SampleConfig(world=None, model=str(args.run_dir), sigma_rel=args.sigma_rel, step=step)
        r = evaluate(args.out / args.run_dir.name / f"step{step}", cfg, n=args.samples, measure=measure)
        print(
            f"step {step:6d}  class accuracy {r['class_accuracy']:.3f}  FD {r['fd']:.2f}  precision {r['precision']:.3f}  "
            f"recall {r['recall']:.3f}  NFE {r['nfe']:g}  ({r['sampling_seconds']:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
