"""``guidelab ems MODEL``: DPM-Solver-v3's empirical model statistics of a checkpoint, stored next to it, or of
a training run folder's post-hoc EMA (``--sigma-rel``, ``--step``), stored in the folder under a name of that
choice, where ``guidelab sample --model RUN --sampler dpm_solver_v3`` with the same choice finds them."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ...errors import GuidelabError, check
from ..cli import main
from ..jobs.assembly import default_ems as default_out  # the one naming rule: where sampling jobs look
from ..jobs.assembly import warn_phema

log = logging.getLogger("guidelab.app.ems")


@main.command("ems")
@click.argument("model", type=click.Path())
@click.option("--data", default="digits", show_default=True, help="'digits' or an image folder (the model's training data).")
@click.option("--resolution", type=int, default=None, help="Image folder: resize to this size.")
@click.option(
    "--out",
    default=None,
    help="Output file (default: MODEL.ems.safetensors next to a checkpoint; RUN/ems-<step>-<sigma_rel>.safetensors).",
)
@click.option("--sigma-rel", type=float, default=None, help="A run folder as MODEL: its post-hoc EMA length (default 0.10).")
@click.option("--step", type=click.IntRange(min=1), default=None, help="A run folder as MODEL: the step (default last).")
@click.option("--samples", type=int, default=512, show_default=True, help="Data points used (the first ones, in file order).")
@click.option("--steps", type=int, default=64, show_default=True, help="Grid intervals in lambda = -log sigma.")
@click.option("--sigma-min", type=float, default=0.002, show_default=True, help="Smallest sigma the statistics cover.")
@click.option("--sigma-max", type=float, default=80.0, show_default=True, help="Largest sigma the statistics cover.")
@click.option(
    "--probes",
    type=int,
    default=4,
    show_default=True,
    help="Rademacher probes per sample for diag(dD/dx); 0: the exact diagonal (one difference per value).",
)
@click.option(
    "--labels",
    type=click.Choice(["data", "null"]),
    default="data",
    show_default=True,
    help="Conditional model: the data's labels, or the null label (the unconditional branch).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch", type=int, default=256, show_default=True, help="Rows per network call.")
@click.option("--device", default="cpu", show_default=True)
def ems_cmd(
    model, data, resolution, out, sigma_rel, step, samples, steps, sigma_min, sigma_max, probes, labels, seed, batch, device
) -> None:
    """Compute DPM-Solver-v3's statistics (l, s, b per lambda and dimension) of MODEL (a checkpoint, or a
    training run folder's post-hoc EMA of --sigma-rel at --step, loaded as ``sample --model RUN`` loads it) on
    data; sample with them via ``samplers.dpm_solver_v3(..., ems=<file>)`` or ``sample --sampler dpm_solver_v3``."""
    import torch

    from ...data import digits, image_folder
    from ...samplers import compute_ems
    from ...training.phema import load_network
    from ..jobs import SampleConfig

    check(samples >= 2, f"--samples must be >= 2, got {samples}")
    check(0 < sigma_min < sigma_max, f"need 0 < --sigma-min < --sigma-max, got {sigma_min}, {sigma_max}")
    check(Path(model).exists(), f"checkpoint not found: {model} (pass a .safetensors checkpoint or a training run folder)")
    run = Path(model).is_dir()
    for flag, v in (("--sigma-rel", sigma_rel), ("--step", step)):
        check(
            run or v is None,
            f"{flag} picks the post-hoc EMA of a training run folder; {model} is not one "
            f"(a checkpoint file has its EMA baked in): drop {flag}",
        )
    if run:
        sigma_rel = SampleConfig.sigma_rel if sigma_rel is None else sigma_rel
        check(0 < sigma_rel < 0.2887, f"--sigma-rel must be in (0, 0.2887), got {sigma_rel!r}")
    out = Path(out) if out else default_out(model, sigma_rel, step)
    net = load_network(model, sigma_rel if run else SampleConfig.sigma_rel, step, device)  # as sampling jobs load it
    ema: dict = {}
    if run:
        ema = {"sigma_rel": float(sigma_rel), "training_step": int(getattr(net, "checkpoint_info", {})["step"])}
        warn_phema(net, f"{model} at sigma_rel {sigma_rel:g}")
    images = digits("train") if data == "digits" else image_folder(data, resolution, getattr(net, "img_channels", 3))
    x0 = images.images[:samples].to(device)
    cond: dict = {}
    condition = getattr(net, "condition", None)
    if condition is not None and condition.key:
        if labels == "null":
            cond = {k: v for k, v in condition.null.items()}
        else:
            if images.labels is None:
                raise GuidelabError(f"{model} is conditional but {data} has no labels: pass --labels null")
            cond = {condition.key: images.labels[:samples].to(device)}
    log.info("EMS of %s on %d images of %s, %d lambdas in [%g, %g]", model, x0.shape[0], data, steps + 1, sigma_min, sigma_max)
    with torch.no_grad():
        stats = compute_ems(
            net,
            x0,
            sigma_min,
            sigma_max,
            steps=steps,
            cond=cond,
            batch=batch,
            probes=probes,
            seed=seed,
            meta={"model": str(model), "data": str(data), "labels": labels if cond else "none", **ema},
        )
    stats.save(out)
    click.echo(f"wrote {out} ({stats})")
