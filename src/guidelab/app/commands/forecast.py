"""``guidelab forecast``: probabilistic forecasts from an unconditional time-series denoiser (TSDiff).

Trains (or loads, ``--model``) a 1-D denoiser of ``context + horizon`` windows of a dataset
(:mod:`guidelab.inverse.series`), forecasts the last ``--test-horizons`` blocks of ``--horizon`` values of
every series with TSDiff self-guidance (mean-squared, quantile) and refine, and scores them by NCRPS and
MSE against the held-out values, next to the seasonal-naive baseline. Everything is checked before
anything is written; every file is written atomically: ``OUT/forecast.json`` (settings, scores, NFE),
``OUT/forecast.png``, ``OUT/forecasts.npz`` and, when trained here, ``OUT/denoiser.safetensors``.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import click
import numpy as np
import torch

from ..._io import atomic_write
from ...errors import check
from ...log import get_logger
from ..cli import _quiet_option, _setup, _threads_option, main

log = get_logger(__name__)
GUIDED = ("tsdiff-mse", "tsdiff-quantile", "tsdiff-refine")


def run_forecast(
    out: str | Path,
    *,
    dataset: str = "stocks",
    log_values: bool = True,
    context: int = 24,
    horizon: int = 12,
    season: int = 12,
    test_horizons: int = 3,
    methods: tuple[str, ...] = GUIDED,
    samples: int = 100,
    steps: int = 100,
    scale: float = 4.0,
    refine_iterations: int = 20,
    model: str | Path | None = None,
    iters: int = 3000,
    hidden: int = 256,
    seed: int = 0,
) -> dict:
    """Train / load, forecast, score and write (see the module doc); returns the JSON written."""
    from ...inverse import series as S
    from ...training.checkpoint import load_model, save_model

    out = Path(out)
    for name, v, lo in (
        ("context", context, 1),
        ("horizon", horizon, 1),
        ("season", season, 1),
        ("test_horizons", test_horizons, 1),
        ("samples", samples, 1),
        ("steps", steps, 1),
        ("refine_iterations", refine_iterations, 1),
        ("iters", iters, 1),
        ("hidden", hidden, 1),
    ):
        check(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name} must be an integer >= {lo}, got {v!r}")
    check(
        isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0,
        f"scale must be a finite number >= 0, got {scale!r}",
    )
    check(season <= context, f"season ({season}) must be at most the context length ({context})")
    check(len(methods) > 0, "no forecaster chosen")
    bad = [m for m in methods if m not in GUIDED]
    check(not bad, f"unknown forecaster {bad[0] if bad else ''!r}; allowed: {', '.join(GUIDED)}")
    check(not out.exists() or out.is_dir(), f"--out {out} exists and is not a folder")
    data = S.dataset(dataset, log=log_values)
    X, test = S.windows(data, context, horizon, test_horizons)
    L = context + horizon
    if model is not None:
        net = load_model(model)
        info = getattr(net, "checkpoint_info", {}).get("series", {})
        check(
            getattr(net, "dim", None) == L and info.get("window") == L,
            f"{model} is not a forecast denoiser of windows of {L} values (context {context} + horizon {horizon}); "
            f"it has {info.get('window', getattr(net, 'dim', '?'))}",
        )
        trained = None
    else:
        t0 = time.time()
        net = S.train_denoiser(S.centred(X, context), iters=iters, hidden=hidden, seed=seed)
        trained = {"iters": iters, "hidden": hidden, "windows": len(X), "seconds": round(time.time() - t0, 1)}
        log.info("trained the denoiser: %d steps on %d windows in %.1f s", iters, len(X), trained["seconds"])
    results, forecasts = {}, {}
    for m in ("seasonal-naive", *methods):
        F, nfe = S.forecast(
            net,
            test,
            context,
            m,
            samples=samples,
            steps=steps,
            scale=scale,
            season=season,
            refine_iterations=refine_iterations,
            seed=seed,
        )
        check(bool(torch.isfinite(F).all()), f"{m} produced NaN or inf forecasts (scale {scale} too large?); nothing written")
        results[m] = {**S.scores(F, test, context, data), "nfe": nfe}
        forecasts[m] = F
        log.info("%s: NCRPS %.4f, NMSE %.5f, %d NFE per sample", m, results[m]["ncrps"], results[m]["nmse"], nfe)
    report = {
        "dataset": dataset,
        "series": list(data.names),
        "log_values": data.log,
        "context": context,
        "horizon": horizon,
        "season": season,
        "test_horizons": test_horizons,
        "test_windows": len(test),
        "samples": samples,
        "steps": steps,
        "scale": scale,
        "refine_iterations": refine_iterations,
        "seed": seed,
        "model": str(model) if model is not None else "trained here: denoiser.safetensors",
        "training": trained,
        "results": results,
    }
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"  # finite, or an error before writing
    png = _plot(forecasts, test, context, data, test_horizons)
    buf = io.BytesIO()
    arrays: dict[str, np.ndarray] = {"truth": data.original(test).numpy()}
    arrays |= {m.replace("-", "_"): data.original(F).numpy() for m, F in forecasts.items()}
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    out.mkdir(parents=True, exist_ok=True)
    if trained is not None:
        save_model(
            out / "denoiser.safetensors", net, series={"window": L, "context": context, "horizon": horizon, "dataset": dataset}
        )
    atomic_write(out / "forecasts.npz", buf.getvalue())
    atomic_write(out / "forecast.png", png)
    atomic_write(out / "forecast.json", text.encode())
    return report


def _plot(forecasts: dict, test: torch.Tensor, context: int, data, test_horizons: int, rows: int = 3) -> bytes:
    """PNG bytes: for the last held-out horizon of the first ``rows`` series, the truth and each forecaster's
    median with its 10-90 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [k * test_horizons + test_horizons - 1 for k in range(rows) if k * test_horizons + test_horizons - 1 < len(test)]
    names = list(forecasts)
    fig, axes = plt.subplots(len(idx), len(names), figsize=(2.6 * len(names), 1.9 * len(idx)), squeeze=False)
    t = np.arange(test.shape[1])
    for r, i in enumerate(idx):
        truth = data.original(test[i]).numpy()
        for c, m in enumerate(names):
            ax = axes[r, c]
            P = data.original(forecasts[m][i]).numpy()[:, context:]
            lo, med, hi = np.quantile(P, [0.1, 0.5, 0.9], axis=0)
            ax.plot(t, truth, color="0.3", lw=0.8)
            ax.fill_between(t[context:], lo, hi, color="C0", alpha=0.3, lw=0)
            ax.plot(t[context:], med, color="C0", lw=1)
            ax.axvline(context - 0.5, color="0.7", lw=0.5)
            ax.tick_params(labelsize=5)
            if r == 0:
                ax.set_title(m, fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


@main.command("forecast")
@click.option("--dataset", default="stocks", show_default=True, help="stocks (matplotlib's monthly Stocks.csv) or a CSV file.")
@click.option("--log/--no-log", "log_values", default=True, show_default=True, help="CSV datasets: model log values.")
@click.option("--context", type=int, default=24, show_default=True, help="Observed values before each forecast.")
@click.option("--horizon", type=int, default=12, show_default=True, help="Values forecast (must be >= 1).")
@click.option(
    "--season", type=int, default=12, show_default=True, help="Season of the seasonal-naive baseline and refine's base."
)
@click.option("--test-horizons", type=int, default=3, show_default=True, help="Held-out horizons at the end of each series.")
@click.option(
    "--method",
    "methods",
    type=click.Choice(GUIDED),
    multiple=True,
    help="Forecaster (repeatable); default all three. seasonal-naive is always scored.",
)
@click.option("--samples", type=int, default=100, show_default=True, help="Samples per window (TSDiff: 100).")
@click.option("--steps", type=int, default=100, show_default=True, help="Steps of TSDiff's linear schedule (TSDiff: 100).")
@click.option("--scale", type=float, default=4.0, show_default=True, help="Self-guidance scale (TSDiff's config default 4).")
@click.option("--refine-iterations", type=int, default=20, show_default=True, help="tsdiff-refine: LMC iterations (TSDiff: 20).")
@click.option("--model", type=click.Path(dir_okay=False, exists=True), default=None, help="A denoiser.safetensors to load.")
@click.option("--iters", type=int, default=3000, show_default=True, help="Training steps when no --model is given.")
@click.option("--hidden", type=int, default=256, show_default=True, help="Width of the denoiser trained here.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for forecast.json / .png / .npz.")
@_threads_option
@_quiet_option
def forecast_cmd(out, threads, quiet, methods, **options) -> None:
    """Forecast held-out values with TSDiff self-guidance and refine on an unconditional 1-D denoiser."""
    _setup(quiet, threads, parameters=1)
    report = run_forecast(out, methods=tuple(methods) or GUIDED, **options)
    for m, r in report["results"].items():
        click.echo(f"{m}: NCRPS {r['ncrps']:.4f}  MSE {r['mse']:.6g}  NMSE {r['nmse']:.5f}  NFE {r['nfe']}")
    click.echo(f"wrote {Path(out) / 'forecast.json'}")
