"""``guidelab inverse`` on the exact digits world: files written, the known region kept, misuse refused."""

import itertools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from guidelab import toy
from guidelab.app.cli import main
from guidelab.errors import GuidelabError
from guidelab.inverse import jump_schedule


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
    path = tmp_path_factory.mktemp("inverse") / "digit.npz"
    x = toy.digits_gmm().sample(1, generator=torch.Generator().manual_seed(7)).reshape(1, 1, 8, 8)
    np.savez(path, x=x.numpy())
    return path


def _run(*args):
    return CliRunner().invoke(main, ["inverse", "digits-gmm", *map(str, args)])


def test_inpaint_writes_samples_that_keep_the_known_pixels(digit, tmp_path):
    r = _run(
        "--task",
        "inpaint",
        "--method",
        "repaint",
        "--input",
        digit,
        "--out",
        tmp_path,
        "--n",
        3,
        "--steps",
        8,
        "--jump-length",
        2,
        "--jump-n-sample",
        2,
        "--sigma-max",
        20,
    )
    assert r.exit_code == 0, r.output
    out = np.load(tmp_path / "samples.npz")
    assert out["x"].shape == (3, 1, 8, 8)
    known = np.ones((1, 8, 8), bool)
    known[:, 2:6, 2:6] = False  # the centre mask
    np.testing.assert_array_equal(out["x"][:, known], np.broadcast_to(out["truth"][known], (3, known.sum())))
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_superres_with_dps(digit, tmp_path):
    r = _run(
        "--task",
        "superres",
        "--method",
        "dps",
        "--input",
        digit,
        "--out",
        tmp_path,
        "--n",
        2,
        "--steps",
        6,
        "--zeta",
        1.0,
        "--sigma-max",
        20,
    )
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "samples.npz")["y"].shape == (1, 4, 4)


def test_misuse_is_one_clear_error(digit, tmp_path):
    for args, message in (
        (("--task", "inpaint", "--method", "ilvr", "--zeta", 1), "--zeta does not apply to --method ilvr"),
        (("--task", "colorize", "--method", "repaint"), "at least 2 channels"),
    ):
        r = _run(*args, "--input", digit, "--out", tmp_path, "--steps", 4)
        # one line, whether the group reports it (exit code 2) or leaves the GuidelabError to `run()`
        assert r.exit_code != 0 and (
            message in r.output or (isinstance(r.exception, GuidelabError) and message in str(r.exception))
        )


def test_run_json_reports_the_counted_nfe(digit, tmp_path):
    r = _run(
        "--task", "inpaint", "--method", "repaint", "--input", digit, "--out", tmp_path, "--n", 2, "--steps", 8,
        "--jump-length", 2, "--jump-n-sample", 3, "--sigma-max", 20,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "run.json").read_text())
    reverse = sum(b > a for a, b in itertools.pairwise(jump_schedule(8, 2, 3)))  # one NFE per reverse transition
    assert info["nfe"] == reverse == 8 + 3 * (3 - 1) * 2
    assert info["method"] == "repaint" and info["steps"] == 8 and info["consistency"] < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "run.json", "samples.npz"]  # no temporary files


def test_bad_input_writes_nothing(tmp_path):
    bad = tmp_path / "nan.npz"
    np.savez(bad, x=np.full((1, 8, 8), np.nan, np.float32))
    out = tmp_path / "out"
    r = _run("--task", "inpaint", "--method", "repaint", "--input", bad, "--out", out, "--steps", 4)
    assert r.exit_code != 0 and isinstance(r.exception, GuidelabError) and "NaN or inf" in str(r.exception)
    assert not out.exists()
