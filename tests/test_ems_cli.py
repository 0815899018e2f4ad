"""``guidelab ems``: statistics of a checkpoint written next to it (safetensors + JSON metadata), usable by
dpm_solver_v3 as an object or a path; bad input is a one-line error with exit code 2. Tiny settings."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from guidelab import samplers, schedules
from guidelab.app import cli
from guidelab.errors import GuidelabError
from guidelab.models.image import PixelMLP
from guidelab.samplers import EMS
from guidelab.training import load_model, save_model


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
