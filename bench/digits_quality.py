"""Quality of a digits run per EMA snapshot step: a loop over :func:`guidelab.app.evaluate.evaluate`
(class accuracy, Fréchet distance, precision / recall, NFE in the digits-classifier feature space
against the test split) at each snapshot step's post-hoc EMA.

    python bench/digits_quality.py RUN_DIR [--sigma-rel 0.1] [--samples 1000] [--out runs/bench/quality]

One step, any guider: use ``guidelab evaluate RUN_DIR --step N ...`` directly (docs/RESULTS.md).

    python bench/digits_quality.py --table runs/eval/digits ROW[:BASELINE] ...

prints docs/RESULTS.md table cells of finished ``guidelab evaluate`` rows (``ROW`` with seed sets 0, and
``ROW_s1000`` / ``ROW_s2000`` where present): FD, class accuracy, precision, recall, NFE, the other seed
sets' FD, and the mean FD over the three paired seed sets with its difference from ``BASELINE``'s mean.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from guidelab.app.evaluate import DigitsMetrics, evaluate
from guidelab.app.jobs import SampleConfig
from guidelab.training.phema import snapshots


def _load(root: Path, row: str, seed: int):
    import json

    f = root / (row if seed == 0 else f"{row}_s{seed}") / "metrics.json"
    return json.loads(f.read_text()) if f.exists() else None


def table(root: Path, rows: list[str]) -> None:
    """One markdown line per row: ``| row | FD | acc | P | R | NFE | FD s1000 / s2000 | mean (delta) |``."""
    for spec in rows:
        row, _, base = spec.partition(":")
        m = [_load(root, row, s) for s in (0, 1000, 2000)]
        if m[0] is None:
            print(f"| {row} | (not run) |")
            continue
        acc = "–" if m[0].get("unconditional") and not m[0].get("guider") == "classifier" else f"{m[0]['class_accuracy']:.3f}"
        nfe = f"{m[0]['nfe']:g}" + (f" + {m[0]['classifier_evals']:g} clf." if m[0].get("classifier_evals") else "")
        other = " / ".join(f"{x['fd']:.1f}" for x in m[1:] if x is not None)
        mean = ""
        if all(x is not None for x in m):
            mu = sum(x["fd"] for x in m) / 3
            mean = f"{mu:.1f}"
            b = [_load(root, base, s) for s in (0, 1000, 2000)] if base else []
            if b and all(x is not None for x in b):
                mean += f" ({mu - sum(x['fd'] for x in b) / 3:+.1f})"
        print(f"| {row} | {m[0]['fd']:.1f} | {acc} | {m[0]['precision']:.3f} | {m[0]['recall']:.3f} | {nfe} | {other} | {mean} |")


def main():
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "--table":
        return table(Path(sys.argv[2]), sys.argv[3:])
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
