"""Probabilistic forecasting with an unconditional time-series denoiser (TSDiff, :mod:`.tsdiff`): data,
windows, the denoiser, the forecasters and their scores. ``guidelab forecast`` and bench/inverse_table.py
build on it.

Data: ``"stocks"`` is matplotlib's bundled ``sample_data/Stocks.csv`` (monthly closing prices 1990-2022 of
8 stocks and 2 indices, offline), modelled as log prices; any CSV of the same layout (a header row, a first
column of dates, one column per series, empty = missing before a series starts) can be given instead.
A window is ``context + horizon`` consecutive values; it is centred on its context mean before the
denoiser sees it. The evaluation windows end at the last ``k`` blocks of ``horizon`` values of every
series; training windows end before the first held-out value.

Scores (on the original scale, e.g. prices): CRPS of the samples (``E|X - y| - E|X - X'| / 2`` per value)
summed and normalised by ``sum |y|`` (NCRPS; TSDiff reports the mean weighted quantile loss, its
discretisation), and the MSE of the mean forecast (plus its normalised form ``/ mean y^2``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..errors import GuidelabError, check
from ..rng import SampleNoise
from ._common import check_int, check_number
from .tsdiff import quantile_levels, tsdiff_guided, tsdiff_refine, tsdiff_sigmas

if TYPE_CHECKING:
    from ..models.mlp import ToyMLP

DATASETS = ("stocks",)
FORECASTERS = ("seasonal-naive", "tsdiff-mse", "tsdiff-quantile", "tsdiff-refine")


@dataclass(frozen=True)
class Series:
    """Named 1-D series (``values``: float64 arrays, each its own length) and whether they are log values."""

    names: tuple[str, ...]
    values: tuple[np.ndarray, ...]
    log: bool

    def original(self, v: torch.Tensor) -> torch.Tensor:
        """Values back on the data's scale (``exp`` of log values)."""
        return v.exp() if self.log else v


def read_csv(path: str | Path, *, log: bool) -> Series:
    """Series from a CSV (header row; first column dates; one column per series; empty cells before a series
    starts are skipped). NaN / inf / empty cells inside a series, or non-positive values with ``log``, are
    an error. Rows whose every value is empty are skipped."""
    path = Path(path)
    check(path.is_file(), f"dataset not found: {path} (allowed: {', '.join(DATASETS)} or a CSV file)")
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(line for line in f if not line.startswith("#")) if r]
    except (OSError, UnicodeDecodeError) as e:
        raise GuidelabError(f"cannot read the dataset {path}: {e}") from None
    check(len(rows) >= 2 and len(rows[0]) >= 2, f"{path}: needs a header row and a column of values after the dates")
    names = tuple(rows[0][1:])
    data = [r for r in rows[1:] if any(c.strip() for c in r[1:])]
    out = []
    for j, name in enumerate(names):
        try:
            v = np.array([float(r[j + 1]) if j + 1 < len(r) and r[j + 1].strip() else np.nan for r in data])
        except ValueError as e:
            raise GuidelabError(f"{path}: series {name!r} holds a value that is not a number ({e})") from None
        start = int(np.argmax(~np.isnan(v))) if (~np.isnan(v)).any() else len(v)
        v = v[start:]
        check(len(v) > 0, f"{path}: series {name!r} has no values")
        check(bool(np.isfinite(v).all()), f"{path}: series {name!r} has NaN, inf or missing values after its start")
        if log:
            check(bool((v > 0).all()), f"{path}: series {name!r} has values <= 0; log values need positive data")
            v = np.log(v)
        out.append(v)
    return Series(names, tuple(out), log)


def stocks() -> Series:
    """Monthly log closing prices (1990-2022) of the 10 series of matplotlib's ``sample_data/Stocks.csv``
    (first trading day of each month)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "Stocks.csv"
    check(path.is_file(), f"matplotlib's sample data is missing ({path})")
    with open(path) as f:
        rows = list(csv.reader(line for line in f if not line.startswith("#")))
    data = [r for r in rows[1:] if r[0].endswith("-01") and any(r[1:])]  # month starts
    out = []
    for j in range(len(rows[0]) - 1):
        v = np.array([float(r[j + 1]) if r[j + 1] else np.nan for r in data])
        out.append(np.log(v[int(np.argmax(~np.isnan(v))) :]))
    return Series(tuple(rows[0][1:]), tuple(out), True)


def dataset(name: str, *, log: bool = True) -> Series:
    """``"stocks"`` or a CSV path (see :func:`read_csv`)."""
    check(isinstance(name, str) and name != "", f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)} or a CSV file")
    if name == "stocks":
        return stocks()
    if not name.lower().endswith(".csv"):
        raise GuidelabError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)} or a .csv file")
    return read_csv(name, log=log)


def windows(series: Series, context: int, horizon: int, test_horizons: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` windows [N, context + horizon]: the test windows' forecast parts are the last
    ``test_horizons`` blocks of ``horizon`` values of each series (series too short are skipped); the training
    windows end before the first held-out value."""
    check_int(context, "context", 1)
    check_int(horizon, "horizon", 1)
    check_int(test_horizons, "test_horizons", 1)
    L, train, test = context + horizon, [], []
    for s in series.values:
        T = len(s)
        end_train = T - test_horizons * horizon
        train += [s[e - L : e] for e in range(L, end_train + 1)]
        test += [s[T - k * horizon - L : T - k * horizon] for k in range(test_horizons - 1, -1, -1) if T - k * horizon - L >= 0]
    check(
        len(train) > 0 and len(test) > 0,
        f"the series are too short for windows of {L} values with {test_horizons} held-out horizons of {horizon}",
    )
    return torch.tensor(np.stack(train), dtype=torch.float32), torch.tensor(np.stack(test), dtype=torch.float32)


def centred(w: torch.Tensor, context: int) -> torch.Tensor:
    """Windows minus their context mean."""
    return w - w[:, :context].mean(1, keepdim=True)


def train_denoiser(
    X: torch.Tensor, *, iters: int = 3000, hidden: int = 256, depth: int = 3, batch: int = 256, seed: int = 0
) -> ToyMLP:
    """A ``ToyMLP`` denoiser of the (centred) windows ``X`` [N, L]: EDM loss (``ln sigma ~ N(-1.2, 1.2^2)``),
    Adam 2e-3, ``sigma_data`` = the windows' std. Deterministic given ``seed``; eval mode, frozen."""
    from ..denoisers import edm_loss
    from ..models.mlp import ToyMLP

    check(isinstance(X, torch.Tensor) and X.ndim == 2 and len(X) > 0, "training windows must be a tensor [N, L]")
    check(bool(torch.isfinite(X).all()), "the training windows contain NaN or inf")
    check_int(iters, "iters", 1)
    torch.manual_seed(seed)
    net = ToyMLP(dim=X.shape[1], hidden=hidden, depth=depth, output="denoiser", sigma_data=max(float(X.std()), 1e-3))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(iters):
        x0 = X[torch.randint(0, len(X), (batch,), generator=g)]
        sigma = (torch.randn(batch, generator=g) * 1.2 - 1.2).exp()
        loss = edm_loss(net, x0 + sigma[:, None] * torch.randn(x0.shape, generator=g), sigma, x0, net.precond).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


def seasonal_naive(w: torch.Tensor, context: int, season: int) -> torch.Tensor:
    """Windows [N, L] with the forecast part replaced by the last full season of the context, repeated."""
    check_int(season, "season", 1)
    check(season <= context, f"season ({season}) must be at most the context length ({context})")
    out = w.clone()
    last = w[:, context - season : context]
    reps = math.ceil((w.shape[1] - context) / season)
    out[:, context:] = last.repeat(1, reps)[:, : w.shape[1] - context]
    return out


def forecast(
    denoiser: Callable[..., torch.Tensor],
    W: torch.Tensor,
    context: int,
    method: str,
    *,
    samples: int = 100,
    steps: int = 100,
    scale: float = 4.0,
    season: int = 12,
    refine_iterations: int = 20,
    seed: int = 0,
) -> tuple[torch.Tensor, int]:
    """``(forecasts [N, samples, L], NFE per sample)`` for the windows ``W`` [N, L] (the forecast parts of
    ``W`` are never read). Methods: ``seasonal-naive`` (one deterministic sample), ``tsdiff-mse`` /
    ``tsdiff-quantile`` (self-guidance on the context, TSDiff's linear 100-step schedule with ``steps`` steps,
    quantile levels ``k / (samples + 1)``), ``tsdiff-refine`` (LMC refinement of the seasonal-naive forecast,
    ``refine_iterations`` iterations). Window ``i`` uses seeds ``1000 i .. 1000 i + samples - 1``."""
    from ._common import Counting

    check(method in FORECASTERS, f"unknown forecaster {method!r}; allowed: {', '.join(FORECASTERS)}")
    check(
        isinstance(W, torch.Tensor) and W.ndim == 2 and 1 <= context < W.shape[1],
        "W must be windows [N, L] with 1 <= context < L",
    )
    check(bool(torch.isfinite(W[:, :context]).all()), "the context values contain NaN or inf")
    check_int(samples, "samples", 1)
    check_int(steps, "steps", 1)
    check_number(scale, "scale")
    check_int(refine_iterations, "refine_iterations", 1)
    base = W[:, :context].mean(1, keepdim=True)
    Z = centred(torch.where(torch.arange(W.shape[1]) < context, W, 0.0), context)
    if method == "seasonal-naive":
        return (seasonal_naive(Z, context, season) + base)[:, None], 0
    L, mask = W.shape[1], torch.arange(W.shape[1]) < context
    sigmas = tsdiff_sigmas(steps)
    D = Counting(denoiser)
    out = []
    for i in range(len(W)):
        noise = SampleNoise(range(1000 * i + seed, 1000 * i + seed + samples))
        z = Z[i]
        if method == "tsdiff-refine":
            init = seasonal_naive(z[None], context, season).expand(samples, -1)
            x = tsdiff_refine(D, init, z, mask, iterations=refine_iterations, noise=noise)
        else:
            kind = method.removeprefix("tsdiff-")
            q = quantile_levels(samples) if kind == "quantile" else None
            x = tsdiff_guided(D, noise.randn([L]) * sigmas[0], sigmas, z, mask, scale=scale, guidance=kind, q=q, noise=noise)
        out.append(x)
    F = torch.stack(out) + base[:, :, None]
    return F, D.nfe // max(1, len(W))


def crps(samples: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample CRPS ``E|X - y| - E|X - X'| / 2`` per value: samples [S, H], y [H] -> [H]."""
    return (samples - y).abs().mean(0) - 0.5 * (samples[:, None] - samples[None]).abs().mean((0, 1))


def scores(F: torch.Tensor, W: torch.Tensor, context: int, series: Series) -> dict[str, float]:
    """NCRPS, MSE and NMSE of forecasts ``F`` [N, S, L] against the held-out part of ``W`` [N, L], on the
    data's original scale."""
    P, Y = series.original(F)[..., context:].double(), series.original(W)[:, context:].double()
    total = sum(float(crps(P[i], Y[i]).sum()) for i in range(len(W)))
    mse = float((P.mean(1) - Y).square().mean())
    return {"ncrps": total / float(Y.abs().sum()), "mse": mse, "nmse": mse / float(Y.square().mean())}
