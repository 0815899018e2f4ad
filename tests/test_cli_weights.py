"""Guidance-weight schedules from the command line (issue 16 item 1): ``--weight linear:1-4`` in sample /
evaluate, ``--weights 2,linear:1-4`` in sweep; job.json records the text and a resume compares it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from guidelab import guidance, samplers, schedules, toy
from guidelab.app import cli, jobs
from guidelab.errors import GuidelabError
from guidelab.rng import SampleNoise

S = ["sample", "--samples", "8", "--shard-size", "8", "--steps", "4", "--quiet", "--guider", "cfg", "--dtype", "float64"]


def _sample(out, weight):
    r = CliRunner().invoke(cli.main, S + ["--weight", weight, "--out", str(out)])
    return r


def test_sample_with_a_schedule_equals_the_api_and_job_json_records_the_text(tmp_path):
    r = _sample(tmp_path / "lin", "linear:1-4")
    assert r.exit_code == 0, r.output
    job = json.loads((tmp_path / "lin" / "job.json").read_text())
    assert job["config"]["w"] == "linear:1-4" and job["provenance"]["weight"] == "linear:1-4"
    x, seeds = jobs.load_samples(tmp_path / "lin")
    # the same run through the public API: cfg on the exact world (guide: the unconditional tree AB)
    main, uncond = toy.tree("A", dtype=torch.float64), toy.tree("AB", dtype=torch.float64)
    sigmas = schedules.karras(4, 0.002, 5.0, 7.0, dtype=torch.float64)
    noise = SampleNoise(seeds.tolist())
    x0 = noise.randn((2,), torch.float64) * sigmas[0]
    D = guidance.cfg(main, guidance.weight_schedule("linear", 1.0, 4.0), uncond=uncond)
    ref = samplers.heun(D, x0, sigmas).numpy()
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-12)
    # a schedule is not a constant: it differs from w = 1 and from w = 4
    for w in ("1", "4"):
        assert _sample(tmp_path / f"c{w}", w).exit_code == 0
        assert not np.allclose(jobs.load_samples(tmp_path / f"c{w}")[0], x)


def test_resume_compares_the_schedule_text(tmp_path):
    assert _sample(tmp_path / "j", "cosine:4-1").exit_code == 0
    again = _sample(tmp_path / "j", "cosine:4-1")
    assert again.exit_code == 0  # same text: a resume
    other = _sample(tmp_path / "j", "cosine:4-2")
    assert isinstance(other.exception, GuidelabError) and "another job" in str(other.exception)
    assert "cosine:4-1" in str(other.exception) and "cosine:4-2" in str(other.exception)


@pytest.mark.parametrize(
    "weight,fragment",
    [
        ("bogus:1-2", "unknown weight schedule"),
        ("linear:a-b", "--weight"),
        ("linear:1-4:bogus=1", "bogus"),
        ("steps:2-1", "steps"),
    ],
)
def test_bad_schedules_are_one_error(tmp_path, weight, fragment):
    r = _sample(tmp_path / "x", weight)
    assert isinstance(r.exception, GuidelabError) and fragment in str(r.exception)
    assert not (tmp_path / "x").exists()


def test_sweep_weights_take_schedules_and_results_show_the_text(tmp_path):
    args = ["sweep", "--samples", "16", "--steps", "3", "--methods", "none,cfg", "--quiet", "--out", str(tmp_path)]
    r = CliRunner().invoke(cli.main, args + ["--weights", "2,linear:1-4,steps:3-1:start=0,stop=1"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    weights = [row["weight"] for row in res["rows"]]
    assert weights == ["1", "2", "linear:1-4", "steps:3-1:start=0,stop=1"]
    assert [row["cell"] for row in res["rows"]][2:] == ["cfg_wlinear_1-4", "cfg_wsteps_3-1_start=0_stop=1"]
    assert res["rows"][2]["w"] == 1.0  # the number for plots: the schedule's w_start
    assert res["provenance"]["weight"] == "1,2,linear:1-4,steps:3-1:start=0,stop=1"
    job = json.loads((tmp_path / "samples" / "cfg_wlinear_1-4" / "job.json").read_text())
    assert job["config"]["w"] == "linear:1-4"
    assert "linear:1-4" in r.output  # the printed table names the cell
    assert cli._weights("2, linear:1-4 ,3") == [2.0, "linear:1-4", 3.0]
    with pytest.raises(GuidelabError, match="--weights"):
        cli._weights("2,bogus:1-2")
