"""``guidelab ems``: statistics of a checkpoint written next to it (safetensors + JSON metadata), usable by
dpm_solver_v3 as an object or a path; of a training run folder's post-hoc EMA written into the folder under
the name of that EMA, found by dpm_solver_v3 jobs on the folder; bad input is a one-line error with exit
code 2 and writes nothing. Tiny settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from guidelab import samplers, schedules
from guidelab.app import cli
from guidelab.app.jobs import SampleConfig, load_samples
from guidelab.app.jobs.assembly import default_ems, ems_file
from guidelab.errors import GuidelabError
from guidelab.models.image import PixelMLP
from guidelab.samplers import EMS
from guidelab.training import load_model, save_model
from guidelab.training.images import ImageConfig, train_images


def _run(args, code=0):
    """Output of a command; ``code=2``: a user mistake, i.e. a GuidelabError (``guidelab`` prints it as
    ``error: ...`` and exits 2) or click's own usage error."""
    r = CliRunner().invoke(cli.main, [str(a) for a in args])
    if code == 2 and isinstance(r.exception, GuidelabError):
        return f"error: {r.exception}"
    assert r.exit_code == code, (r.output, r.exception)
    return r.output


def test_ems_next_to_the_checkpoint_and_sampling_with_it(tmp_path):
    torch.manual_seed(0)
    path = save_model(tmp_path / "u.safetensors", PixelMLP(hidden=8, depth=1, emb=4, num_classes=0, img_channels=1))
    out = _run(["ems", path, "--samples", 16, "--steps", 4, "--sigma-min", 0.01, "--sigma-max", 10])
    ems_path = tmp_path / "u.ems.safetensors"
    assert f"wrote {ems_path}" in out
    stats = EMS.load(ems_path)
    assert stats.shape == (1, 8, 8) and stats.lambdas.numel() == 5 and stats.meta["n"] == 16
    assert stats.meta["model"] == str(path) and stats.meta["labels"] == "none"
    lo, hi = stats.sigma_range
    assert torch.isfinite(stats.l).all() and abs(lo - 0.01) < 1e-12 and abs(hi - 10) < 1e-9
    net = load_model(path)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 10
    sig = schedules.karras(5, 0.01, 10.0)
    a = samplers.dpm_solver_v3(net, x.clone(), sig, ems=str(ems_path))
    assert torch.isfinite(a).all() and torch.equal(a, samplers.dpm_solver_v3(net, x.clone(), sig, ems=stats))
    # the same seed gives the same statistics (deterministic), another seed others
    _run(
        ["ems", path, "--samples", 16, "--steps", 4, "--sigma-min", 0.01, "--sigma-max", 10, "--out", tmp_path / "b.safetensors"]
    )
    assert torch.equal(EMS.load(tmp_path / "b.safetensors").l, stats.l)


def test_conditional_model_uses_labels_or_null(tmp_path):
    torch.manual_seed(0)
    net = PixelMLP(hidden=8, depth=1, emb=4, num_classes=10)
    with torch.no_grad():
        for p in net.parameters():  # an untrained net may ignore its label (zero-initialised embedding)
            p.normal_(0, 0.3)
    path = save_model(tmp_path / "c.safetensors", net)
    _run(["ems", path, "--samples", 8, "--steps", 2, "--out", tmp_path / "data.safetensors"])
    _run(["ems", path, "--samples", 8, "--steps", 2, "--labels", "null", "--out", tmp_path / "null.safetensors"])
    a, b = EMS.load(tmp_path / "data.safetensors"), EMS.load(tmp_path / "null.safetensors")
    assert a.meta["labels"] == "data" and b.meta["labels"] == "null"
    assert (a.b - b.b).abs().max() > 0  # the labels reach the network


def test_bad_input_exit_2(tmp_path):
    out = _run(["ems", tmp_path / "missing.safetensors"], code=2)
    assert "error:" in out
    torch.manual_seed(0)
    path = save_model(tmp_path / "u.safetensors", PixelMLP(hidden=8, depth=1, emb=4, num_classes=0, img_channels=1))
    assert "--sigma-min" in _run(["ems", path, "--sigma-min", 5, "--sigma-max", 1], code=2)
    assert "--samples must be >= 2" in _run(["ems", path, "--samples", 1], code=2)
    assert not (tmp_path / "u.ems.safetensors").exists()  # nothing written before the checks pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run: snapshots at steps 4 and 8 of the EMA profiles 0.05 and 0.10."""
    cfg = ImageConfig(iters=8, hidden=16, depth=1, emb=8, batch=16, snapshot_every=4, lr_ref_steps=4)
    return train_images(tmp_path_factory.mktemp("runs"), cfg, progress=False, threads=1, plot=False).parent


EMS_ARGS = ["--samples", 16, "--steps", 4, "--sigma-min", 0.01, "--sigma-max", 10]
SAMPLE = ["sample", "--sampler", "dpm_solver_v3", "--steps", 4, "--samples", 3, "--sigma-min", 0.01, "--sigma-max", 10]


def test_run_folder_end_to_end(run, tmp_path):
    """``guidelab ems RUN`` computes the statistics of the post-hoc EMA that ``sample --model RUN`` samples
    (the same as of the exported checkpoint), writes them into the folder under the name of that EMA, and a
    dpm_solver_v3 job on the folder with the same choice finds them (samples equal the exported checkpoint's)."""
    out = _run(["ems", run, *EMS_ARGS])
    path = run / "ems-0000008-0.1.safetensors"  # default: sigma_rel 0.10 at the last snapshot
    assert f"wrote {path}" in out and default_ems(run) == path == default_ems(run, 0.1, 8)
    stats = EMS.load(path)
    assert stats.meta["sigma_rel"] == 0.1 and stats.meta["training_step"] == 8 and stats.meta["model"] == str(run)
    _run(["phema", run, "--sigma-rel", 0.1, "--out", tmp_path / "m.safetensors"])
    _run(["ems", tmp_path / "m.safetensors", *EMS_ARGS])
    ref = EMS.load(tmp_path / "m.ems.safetensors")
    assert all(torch.equal(getattr(stats, k), getattr(ref, k)) for k in ("lambdas", "l", "s", "b"))
    _run([*SAMPLE, "--model", run, "--out", tmp_path / "r", "--quiet"])
    _run([*SAMPLE, "--model", tmp_path / "m.safetensors", "--sampler-option", f"ems={path}", "--out", tmp_path / "f", "--quiet"])
    assert np.array_equal(load_samples(tmp_path / "r")[0], load_samples(tmp_path / "f")[0])
    assert ems_file(SampleConfig(world=None, model=str(run), sampler="dpm_solver_v3")) == path
    # another EMA choice has its own file
    _run(["ems", run, "--sigma-rel", 0.05, "--step", 4, *EMS_ARGS])
    other = run / "ems-0000004-0.05.safetensors"
    assert other.is_file() and EMS.load(other).meta["training_step"] == 4
    cfg = SampleConfig(world=None, model=str(run), sampler="dpm_solver_v3", sigma_rel=0.05, step=4)
    assert ems_file(cfg) == other


def test_run_folder_wrong_choice_is_refused_naming_the_command(run, tmp_path):
    _run(["ems", run, *EMS_ARGS])
    for extra, cmd in (
        (["--sigma-rel", 0.07], f"`guidelab ems {run} --sigma-rel 0.07 --step 8`"),
        (["--step", 4], f"`guidelab ems {run} --sigma-rel 0.1 --step 4`"),
    ):
        err = _run([*SAMPLE, "--model", run, *extra, "--out", tmp_path / "x", "--quiet"], code=2)
        assert err.startswith("error: dpm_solver_v3 needs the statistics of") and cmd in err, err
        assert "ems-0000008-0.1.safetensors" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_run_folder_bad_input_writes_nothing(run, tmp_path):
    before = sorted(p.name for p in run.iterdir())
    torch.manual_seed(0)
    path = save_model(tmp_path / "u.safetensors", PixelMLP(hidden=8, depth=1, emb=4, num_classes=0, img_channels=1))
    assert "--sigma-rel picks the post-hoc EMA of a training run folder" in _run(["ems", path, "--sigma-rel", 0.05], code=2)
    assert "--step picks the post-hoc EMA" in _run(["ems", path, "--step", 4], code=2)
    assert not (tmp_path / "u.ems.safetensors").exists()
    assert "--sigma-rel must be in (0, 0.2887)" in _run(["ems", run, "--sigma-rel", 0.5], code=2)
    assert "step must be an integer in [1, 8]" in _run(["ems", run, "--step", 99], code=2)
    (tmp_path / "empty").mkdir()
    assert "no EMA snapshots" in _run(["ems", tmp_path / "empty", *EMS_ARGS], code=2)
    assert sorted(p.name for p in run.iterdir()) == before and not any((tmp_path / "empty").iterdir())
