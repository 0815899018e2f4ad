"""``--sampler-option KEY=VALUE`` of sample / evaluate / sweep, and DPM-Solver-v3 from the command line: its
statistics read from ``MODEL.ems.safetensors`` (``guidelab ems MODEL``) or ``ems=PATH|degenerate``, their sha256
in job.json (a resume with changed statistics is refused); bad input is one error line, exit 2. Tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from guidelab import samplers, schedules
from guidelab.app import cli, provenance
from guidelab.app.jobs import SampleConfig, load_samples
from guidelab.app.jobs.assembly import default_ems, ems_file
from guidelab.errors import GuidelabError
from guidelab.models.image import PixelMLP
from guidelab.rng import SampleNoise
from guidelab.samplers import EMS
from guidelab.training import load_model, save_model

#: The sigma range of the statistics and of the sampling grid (an untrained net's statistics are extreme
#: near sigma 0.002: DPM-Solver-v3 then overflows on a 4-step grid there, a sampler matter, not the CLI's).
RANGE = ["--sigma-min", "0.01", "--sigma-max", "10"]


def _run(args, code=0):
    """Output of a command; ``code=2``: a user mistake, i.e. a GuidelabError (``guidelab`` prints it as
    ``error: ...`` and exits 2) or click's own usage error."""
    r = CliRunner().invoke(cli.main, [str(a) for a in args])
    if code == 2 and isinstance(r.exception, GuidelabError):
        return f"error: {r.exception}"
    assert r.exit_code == code, (r.output, r.exception)
    return r.output


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    return save_model(tmp_path / "u.safetensors", PixelMLP(hidden=8, depth=1, emb=4, num_classes=0, img_channels=1))


def _ems(model, out=None, seed=0):
    _run(["ems", model, "--samples", 16, "--steps", 16, *RANGE, "--seed", seed, *(["--out", out] if out else [])])


def _sample(model, out, *extra, code=0):
    args = ["sample", "--model", model, "--sampler", "dpm_solver_v3", "--steps", 4, "--samples", 3, *RANGE, "--quiet"]
    return _run([*args, "--out", out, *extra], code=code)


def test_dpm_solver_v3_reads_the_statistics_next_to_the_checkpoint(tmp_path, model):
    """sample --sampler dpm_solver_v3 finds MODEL.ems.safetensors: the samples equal the sampler called by hand
    with those statistics; ems=PATH gives the same samples; job.json holds the file's sha256 and a resume with
    other statistics is refused."""
    _ems(model)
    path = tmp_path / "u.ems.safetensors"
    assert default_ems(model) == path
    _sample(model, tmp_path / "auto")
    x, seeds = load_samples(tmp_path / "auto")
    sig = schedules.karras(4, 0.01, 10.0)
    x0 = SampleNoise(seeds.tolist()).randn([1, 8, 8], torch.float32) * sig[0]
    ref = samplers.dpm_solver_v3(load_model(model), x0, sig, ems=EMS.load(path))
    assert np.allclose(x, ref.numpy(), atol=1e-5) and np.isfinite(x).all()
    _sample(model, tmp_path / "given", "--sampler-option", f"ems={path}")
    assert np.array_equal(load_samples(tmp_path / "given")[0], x)
    job = json.loads((tmp_path / "auto" / "job.json").read_text())
    assert job["inputs"]["ems"] == provenance.file_sha256(path)
    _ems(model, seed=1)  # other statistics under the same name
    assert "the ems file changed" in _sample(model, tmp_path / "auto", code=2)
    degenerate = _sample(model, tmp_path / "deg", "--sampler-option", "ems=degenerate", "--sampler-option", "order=2")
    assert "wrote" in degenerate and not np.allclose(load_samples(tmp_path / "deg")[0], x, atol=1e-3)
    deg_job = json.loads((tmp_path / "deg" / "job.json").read_text())
    assert deg_job["config"]["sampler_options"] == {"ems": "degenerate", "order": 2} and "ems" not in deg_job["inputs"]


def test_missing_statistics_is_one_error_line_naming_guidelab_ems(tmp_path, model):
    for cmd in (
        ["sample", "--model", model, "--samples", 3, "--out", tmp_path / "s"],
        ["evaluate", model, "--samples", 10, "--out", tmp_path / "e"],
        ["sweep", "--model", model, "--samples", 16, "--methods", "none", "--weights", 1, "--out", tmp_path / "w"],
    ):
        err = _run([*cmd, "--sampler", "dpm_solver_v3", "--steps", 4, "--quiet"], code=2)
        assert err.startswith("error: dpm_solver_v3 needs the model's statistics") and f"`guidelab ems {model}`" in err
    assert "no such statistics file" in _sample(model, tmp_path / "p", "--sampler-option", "ems=none.safetensors", code=2)
    assert not any((tmp_path / d).exists() for d in "sewp")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(GuidelabError, match="no EMA snapshots"):  # run folders: tests/test_ems_cli.py
        ems_file(SampleConfig(world=None, model=str(run), sampler="dpm_solver_v3"))
    with pytest.raises(GuidelabError, match="exact world needs statistics"):
        ems_file(SampleConfig(world="A", sampler="dpm_solver_v3"))
    assert ems_file(SampleConfig(world="A", sampler="heun")) is None


def test_sampler_options_parsed_and_checked(tmp_path, model):
    """Values are numbers, booleans or text (job.json records them typed); an unknown key names the sampler's
    keywords; a malformed or repeated option is a usage error; all before anything is written."""
    out = tmp_path / "h"
    base = ["sample", "--model", model, "--sampler", "heun", "--steps", 3, "--samples", 2, "--quiet"]
    _run([*base, "--out", out, "--sampler-option", "s_churn=2", "--sampler-option", "s_noise=1.5"])
    assert json.loads((out / "job.json").read_text())["config"]["sampler_options"] == {"s_churn": 2, "s_noise": 1.5}
    plain = tmp_path / "plain"
    _run([*base, "--out", plain])
    assert not np.array_equal(load_samples(out)[0], load_samples(plain)[0])  # the options reach the sampler
    err = _run([*base, "--out", tmp_path / "x", "--sampler-option", "ems=a"], code=2)
    assert err == "error: sampler heun takes no option ems; allowed: s_churn, s_tmin, s_tmax, s_noise"
    assert "KEY=VALUE" in _run([*base, "--out", tmp_path / "x", "--sampler-option", "s_churn"], code=2)
    twice = ["--sampler-option", "s_churn=1", "--sampler-option", "s_churn=2"]
    assert "given twice" in _run([*base, "--out", tmp_path / "x", *twice], code=2)
    assert not (tmp_path / "x").exists()
    _run(["sample", "--world", "A", "--sampler", "unipc", "--samples", 2, "--steps", 3, "--sampler-option", "corrector=false",
          "--out", tmp_path / "w", "--quiet"])  # fmt: skip
    assert json.loads((tmp_path / "w" / "job.json").read_text())["config"]["sampler_options"] == {"corrector": False}


def test_default_ems_is_the_name_next_to_the_checkpoint():
    # guidelab ems writes there by default (it uses this same function) and sampling jobs look there
    expected = {
        "m.safetensors": "m.ems.safetensors",
        "runs/a.b.safetensors": "runs/a.b.ems.safetensors",
        "edm2.pkl": "edm2.pkl.ems.safetensors",
        "plain": "plain.ems.safetensors",
    }
    for name, path in expected.items():
        assert default_ems(name) == Path(path)
