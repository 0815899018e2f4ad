"""The ``guidelab`` command line: a thin layer over importable functions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .errors import GuidelabError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="guidelab")
def main() -> None:
    """guidelab: guiding diffusion models (CFG, autoguidance, ...) behind one contract."""


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              help="Output folder (models are cached in OUT/models).")
@click.option("--samples", "n", type=click.IntRange(min=16), default=4096, help="Samples per method and weight.")
@click.option("--seed", type=int, default=0, help="Seed of the initial points and the reference set.")
@click.option("--quick", is_flag=True, help="Tiny models, for a smoke test; too short to show the paper's finding.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out: Path, n: int, seed: int, quick: bool, quiet: bool) -> None:
    """Autoguidance vs CFG on the exact 2-D tree: train, sample, measure, write OUT/report.html."""
    from . import demo as demo_mod
    records = demo_mod.run(out, n=n, seed=seed, progress=not quiet,
                           model_overrides=demo_mod.QUICK if quick else None)
    click.echo(f"{'method':>13} {'w':>4} {'mean_logp':>9} {'precision':>9} {'recall':>7}")
    for r in records:
        click.echo(f"{r.method:>13} {r.w:>4g} {r.mean_logp:>9.3f} {r.precision:>9.3f} {r.recall:>7.3f}")
    for claim, ok, evidence in demo_mod.check_finding(records):
        click.echo(f"[{'holds' if ok else 'DOES NOT HOLD'}] {claim}: {evidence}")
    click.echo(f"wrote {out / 'report.html'} and {out / 'metrics.json'}")


@main.command("samplers")
def list_samplers() -> None:
    """List the available samplers."""
    from . import samplers
    for name in samplers.names():
        click.echo(name)


def _sample_options(f):
    """Options shared by ``sample`` and ``sweep``: what to sample and how (see guidelab.jobs.SampleConfig)."""
    opts = [
        click.option("--world", default=None, help="Exact tree to sample: A, B or AB (default A when no --model)."),
        click.option("--model", type=click.Path(dir_okay=False), default=None, help="Model checkpoint (.safetensors)."),
        click.option("--guide", type=click.Path(dir_okay=False), default=None,
                     help="Guide checkpoint: the weaker model (autoguidance) or the unconditional one (cfg)."),
        click.option("--label", type=int, default=None, help="Class label passed to the model."),
        click.option("--sampler", default="heun", help="Sampler name (guidelab samplers)."),
        click.option("--steps", type=click.IntRange(min=2), default=32, help="Karras schedule steps."),
        click.option("--sigma-min", type=float, default=0.002),
        click.option("--sigma-max", type=float, default=5.0),
        click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _config(world, model, **kw):
    from .jobs import SampleConfig
    return SampleConfig(world=world if (world or model) else "A", model=model, **kw)


@main.command("sample")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder of shards.")
@click.option("--samples", "n", type=click.IntRange(min=1), default=4096, help="Number of samples (seeds seed-start ...).")
@click.option("--seed-start", type=int, default=0, help="First seed.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, help="Samples per shard (one batch).")
@click.option("--guider", type=click.Choice(["none", "cfg", "autoguidance"]), default="none")
@click.option("--weight", "w", type=float, default=1.0, help="Guidance weight (1 = no guidance).")
@_sample_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sample_cmd(out, n, seed_start, shard_size, guider, w, world, model, quiet, **kw) -> None:
    """Sample into OUT/shard-*.npz with per-sample seeds; resumable; splits shards over torchrun ranks."""
    from . import jobs
    cfg = _config(world, model, guider=guider, w=w, **kw)
    paths = jobs.sample(out, cfg, n=n, seed_start=seed_start, shard_size=shard_size, progress=not quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"wrote {len(paths)} shards ({n} samples) to {out}")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GuidelabError(f"expected comma-separated numbers, got {text!r}") from None


@main.command("sweep")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--methods", default="none,cfg", help="Comma-separated guiders: none, cfg, autoguidance.")
@click.option("--weights", default="1,1.5,2,3", help="Comma-separated guidance weights.")
@click.option("--intervals", default="", help="Guidance intervals lo-hi, comma-separated (e.g. 0.3-5); empty: always.")
@click.option("--samples", "n", type=click.IntRange(min=16), default=2048, help="Samples per cell.")
@click.option("--seed-start", type=int, default=0)
@click.option("--metric", default="fd", help="Metric choosing the best weight per method.")
@click.option("--quality", default="precision", help="Quality axis of the Pareto front.")
@click.option("--diversity", default="recall", help="Diversity axis of the Pareto front.")
@click.option("--uncond", type=click.Path(dir_okay=False), default=None, help="cfg: unconditional model checkpoint.")
@click.option("--reference", type=click.Path(dir_okay=False), default=None,
              help="Reference samples (.npz with 'samples'); default on an exact world: its exact samples.")
@_sample_options
def sweep_cmd(out, methods, weights, intervals, n, seed_start, metric, quality, diversity, uncond, reference,
              world, model, guide, **kw) -> None:
    """Methods x weights (x intervals) -> OUT/results.csv and .json, best weight per method, Pareto front."""
    import numpy as np
    import torch
    from . import sweep
    ivs = [tuple(_floats(s.replace("-", ","))) for s in intervals.split(",") if s.strip()] or [None]
    ref = torch.from_numpy(np.load(reference)["samples"]) if reference else None
    base = _config(world, model, guide=guide, **kw)
    res = sweep.run(out, base, {m.strip(): _floats(weights) for m in methods.split(",") if m.strip()}, n=n,
                    seed_start=seed_start, intervals=ivs, reference=ref, metric=metric, quality=quality,
                    diversity=diversity, guides={"cfg": uncond, "autoguidance": guide})
    for r in res["rows"]:
        click.echo(f"{r['cell']:>24} {metric}={r[metric]:.4g} {quality}={r[quality]:.3f} {diversity}={r[diversity]:.3f}")
    click.echo(f"best by {metric}: {res['best']}")
    click.echo(f"Pareto front ({quality} vs {diversity}): {res['pareto']}")
    click.echo(f"wrote {out / 'results.csv'} and {out / 'results.json'}")


@main.command("report")
@click.argument("sweep_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Default: SWEEP_DIR/report.html.")
def report_cmd(sweep_dir: Path, out) -> None:
    """Static HTML report of a sweep (trade-off plots, sample grids, table); opens from disk."""
    from . import report
    click.echo(f"wrote {report.render(sweep_dir, out)}")


def run() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2."""
    try:
        main(standalone_mode=True)
    except GuidelabError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
