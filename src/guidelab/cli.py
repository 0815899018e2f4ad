"""The ``guidelab`` command line: a thin layer over importable functions."""

from __future__ import annotations

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


def run() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2."""
    try:
        main(standalone_mode=True)
    except GuidelabError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
