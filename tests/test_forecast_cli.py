"""``guidelab forecast``: files written atomically with scores that match their definitions, a saved
denoiser reloads to the same forecasts, and bad input is one clear error with nothing written."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from guidelab.app.cli import main
from guidelab.errors import GuidelabError
from guidelab.inverse import series

TINY = ["--iters", "5", "--samples", "3", "--steps", "3", "--refine-iterations", "2", "--test-horizons", "1", "--threads", "1"]


def _run(*args):
    return CliRunner().invoke(main, ["forecast", *map(str, args)])


def _error(r, message: str) -> bool:
    """One line, whether the group reports it (exit code 2) or leaves the GuidelabError to ``run()``."""
    return r.exit_code != 0 and (message in r.output or (isinstance(r.exception, GuidelabError) and message in str(r.exception)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("forecast") / "run"
    r = _run("--out", out, *TINY)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow  # trains (5 steps) and imports the optimiser and pyplot: ~15 s on a loaded machine
def test_writes_scores_that_match_their_definitions(trained):
    report = json.loads((trained / "forecast.json").read_text())
    assert set(report["results"]) == {"seasonal-naive", "tsdiff-mse", "tsdiff-quantile", "tsdiff-refine"}
    nfe = {m: r["nfe"] for m, r in report["results"].items()}
    assert nfe == {"seasonal-naive": 0, "tsdiff-mse": 3, "tsdiff-quantile": 3, "tsdiff-refine": 2}
    data = np.load(trained / "forecasts.npz")
    truth, snaive = data["truth"], data["seasonal_naive"]
    assert truth.shape == (10, 36) and data["tsdiff_mse"].shape == (10, 3, 36)  # 10 series, one held-out horizon each
    # seasonal naive repeats the last 12 context months; with one sample its CRPS is the absolute error
    np.testing.assert_allclose(snaive[:, 0, 24:], truth[:, 12:24], rtol=1e-5)
    ncrps = np.abs(snaive[:, 0, 24:] - truth[:, 24:]).sum() / np.abs(truth[:, 24:]).sum()
    assert report["results"]["seasonal-naive"]["ncrps"] == pytest.approx(ncrps, rel=1e-5)
    mse = ((data["tsdiff_mse"][:, :, 24:].mean(1) - truth[:, 24:]) ** 2).mean()
    assert report["results"]["tsdiff-mse"]["mse"] == pytest.approx(mse, rel=1e-4)
    assert (trained / "forecast.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in trained.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.slow
def test_saved_denoiser_reloads_to_the_same_forecasts(trained, tmp_path):
    r = _run("--out", tmp_path, "--model", trained / "denoiser.safetensors", "--method", "tsdiff-mse", *TINY)
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "forecast.json").read_text())["results"]["tsdiff-mse"]
    first = json.loads((trained / "forecast.json").read_text())["results"]["tsdiff-mse"]
    assert again == first
    assert not (tmp_path / "denoiser.safetensors").exists()  # loaded, not trained
    r = _run("--out", tmp_path / "other", "--model", trained / "denoiser.safetensors", "--horizon", 6, *TINY)
    assert _error(r, "not a forecast denoiser of windows of 30 values")
    assert not (tmp_path / "other").exists()


def test_bad_input_is_one_clear_error_and_nothing_is_written(tmp_path):
    csv = tmp_path / "gap.csv"
    csv.write_text("date,a\n" + "".join(f"2000-{i},{1 + i % 7}\n" for i in range(40)) + "2004-1,nan\n2004-2,3\n")
    (tmp_path / "file").write_text("x")
    for args, message in (
        (("--horizon", 0), "horizon must be an integer >= 1"),
        (("--horizon", -3), "horizon must be an integer >= 1"),
        (("--dataset", "nonesuch"), "unknown dataset 'nonesuch'"),
        (("--dataset", csv), "has NaN, inf or missing values after its start"),
        (("--scale", "nan"), "scale must be a finite number"),
        (("--season", 30), "season (30) must be at most the context length (24)"),
    ):
        out = tmp_path / "out"
        r = _run("--out", out, *args, *TINY)
        assert _error(r, message), (args, r.output, r.exception)
        assert not out.exists()
    r = _run("--out", tmp_path / "file", *TINY)
    assert r.exit_code == 2 and "is a file" in r.output  # click refuses it before the command runs


def test_forecast_counts_nfe_and_keeps_the_context_out_of_reach():
    import torch

    from guidelab.models.mlp import ToyMLP

    torch.manual_seed(0)
    net = ToyMLP(dim=10, hidden=16, depth=1, output="denoiser").eval().requires_grad_(False)
    W = torch.randn(3, 10)
    F, nfe = series.forecast(net, W, 6, "tsdiff-mse", samples=2, steps=4, season=4)
    assert F.shape == (3, 2, 10) and nfe == 4
    W2 = W.clone()
    W2[:, 6:] = float("nan")  # the held-out part is never read
    torch.testing.assert_close(series.forecast(net, W2, 6, "tsdiff-mse", samples=2, steps=4, season=4)[0], F)
    F, nfe = series.forecast(net, W, 6, "tsdiff-refine", samples=2, refine_iterations=3, season=4)
    assert nfe == 3
    with pytest.raises(GuidelabError, match="the context values contain NaN"):
        series.forecast(net, W2[:, [0, 7, 8, 9, 1, 2, 3, 4, 5, 6]], 6, "tsdiff-mse")


def test_csv_dataset_and_windows(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("date,a,b\n" + "".join(f"t{i},{i + 1},{'' if i < 5 else 2 * i}\n" for i in range(30)))
    data = series.dataset(str(csv), log=False)
    assert data.names == ("a", "b") and len(data.values[1]) == 25  # leading empties skipped
    train, test = series.windows(data, 6, 4, 2)
    np.testing.assert_array_equal(test[0].numpy(), np.arange(17, 27))  # a: the horizon before the last
    np.testing.assert_array_equal(test[1].numpy(), np.arange(21, 31))  # a: the last horizon
    assert len(train) == 13 + 8 and float(train[:13, -1].max()) == 22  # a's windows end before its first held-out value
    snaive = series.seasonal_naive(test[:1], 6, 4)
    np.testing.assert_array_equal(snaive[0, 6:].numpy(), [19, 20, 21, 22])
