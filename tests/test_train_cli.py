import pytest
import torch
from click.testing import CliRunner

from guidelab.app import cli
from guidelab.data import digits
from guidelab.errors import GuidelabError
from guidelab.models import build
from guidelab.training import load, load_model, snapshot_path
from guidelab.training.images import ImageConfig, load_data, model_config, train_images
from guidelab.training.phema import reconstruct

TINY = dict(hidden=16, depth=1, emb=8, batch=16, snapshot_every=4, lr_ref_steps=4)


def test_train_command_config_file_and_overrides(tmp_path):
    (tmp_path / "c.toml").write_text("hidden = 16\ndepth = 1\nemb = 8\nbatch = 8\niters = 40\nema = [0.05, 0.1]\n")
    args = [
        "train",
        "--config",
        str(tmp_path / "c.toml"),
        "--set",
        "iters=6",
        "--set",
        "snapshot_every=3",
        "--out",
        str(tmp_path / "runs"),
        "--quiet",
        "--threads",
        "1",
    ]
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code == 0, r.output
    (run,) = (tmp_path / "runs").iterdir()
    for f in ["state.safetensors", "loss.png", "grid.png", "ema-0000003-0.05.safetensors", "ema-0000006-0.1.safetensors"]:
        assert (run / f).exists(), f
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = load_model(run / "ema-0000006-0.05.safetensors")
    meta = m.checkpoint_info["meta"]
    assert meta["iters"] == 6 and meta["batch"] == 8 and meta["recipe"] == "images"
    assert m.num_classes == 10 and m.null_label == 10 and m.img_resolution == 8
    # A finished run is reused: the same run folder, nothing retrained.
    state = (run / "state.safetensors").read_bytes()
    r2 = CliRunner().invoke(cli.main, args + ["--no-grid"])
    assert r2.exit_code == 0 and str(run) in r2.output and (run / "state.safetensors").read_bytes() == state


@pytest.mark.parametrize(
    "args, match",
    [
        (["--set", "hiden=3"], "unknown image config keys"),
        (["--set", "label_dropout=2"], "label_dropout"),
        (["--set", "oops"], "KEY=VALUE"),
    ],
)
def test_train_command_errors(tmp_path, args, match):
    r = CliRunner().invoke(cli.main, ["train", "--out", str(tmp_path), "--quiet"] + args)
    assert isinstance(r.exception, GuidelabError) and r.exception.args[0].count("\n") == 0
    assert match in str(r.exception)


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", [3, 7])
def test_kill_and_resume_is_bit_identical(tmp_path, kill_at):
    cfg = ImageConfig(iters=10, label_dropout=0.5, **TINY)

    def killer(step, loss):
        if step == kill_at:
            raise Killed

    full = train_images(tmp_path / "full", cfg, progress=False, checkpoint_every=3, threads=1, plot=False)
    with pytest.raises(Killed):
        train_images(tmp_path / "res", cfg, progress=False, checkpoint_every=3, threads=1, plot=False, on_step=killer)
    resumed = train_images(tmp_path / "res", cfg, progress=False, checkpoint_every=3, threads=1, plot=False)
    a, ca = load(full.parent / "state.safetensors")
    b, cb = load(resumed.parent / "state.safetensors")
    assert ca == cb and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for s in (4, 8, 10):
        for r in cfg.ema:
            assert snapshot_path(full.parent, s, r).read_bytes() == snapshot_path(resumed.parent, s, r).read_bytes()


def test_training_learns_to_denoise_digits(tmp_path):
    cfg = ImageConfig(iters=150, hidden=64, depth=2, emb=16, batch=64, lr=3e-3, lr_ref_steps=100, snapshot_every=50)
    final = train_images(tmp_path, cfg, progress=False, threads=1, plot=False)
    test = digits("test")
    g = torch.Generator().manual_seed(0)
    sigma = torch.full((len(test),), 0.5)
    x = test.images + sigma[:, None, None, None] * torch.randn(test.images.shape, generator=g)
    err = lambda m: (m(x, sigma, label=test.labels) - test.images).square().mean().item()
    untrained = build(model_config(cfg, load_data(cfg))).eval()
    with torch.no_grad():
        assert err(load_model(final)) < 0.7 * err(untrained)


def test_phema_command(tmp_path):
    cfg = ImageConfig(iters=8, **TINY)
    run = train_images(tmp_path, cfg, progress=False, threads=1, plot=False).parent
    r = CliRunner().invoke(cli.main, ["phema", str(run), "--sigma-rel", "0.07", "--out", str(tmp_path / "g.safetensors")])
    assert r.exit_code == 0, r.output
    m, ref = load_model(tmp_path / "g.safetensors"), reconstruct(run, 0.07)
    assert m.checkpoint_info["sigma_rel"] == 0.07 and m.checkpoint_info["kind"] == "phema"
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())
    # a sigma_rel far outside what the snapshots can reproduce: written, but with a warning (issue 15)
    errs = []
    for sigma_rel in (0.07, 0.28):
        r = CliRunner().invoke(
            cli.main, ["phema", str(run), "--sigma-rel", str(sigma_rel), "--out", str(tmp_path / f"{sigma_rel}.st")]
        )
        assert r.exit_code == 0, r.output
        errs.append(
            (
                load_model(tmp_path / f"{sigma_rel}.st").checkpoint_info["phema_error"],
                r.stderr if r.stderr_bytes is not None else r.output,
            )
        )
    assert errs[0][0] <= 0.1 < errs[1][0]  # one of each
    for err, text in errs:
        assert ("warning: the post-hoc EMA" in text) == (err > 0.1), (err, text)


def test_train_command_unet(tmp_path):
    r = CliRunner().invoke(
        cli.main,
        [
            "train",
            "--set",
            "model=UNet",
            "--set",
            "hidden=8",
            "--set",
            "depth=1",
            "--set",
            "emb=16",
            "--set",
            "batch=8",
            "--set",
            "iters=4",
            "--set",
            "snapshot_every=2",
            "--out",
            str(tmp_path),
            "--quiet",
            "--no-grid",
        ],
    )
    assert r.exit_code == 0, r.output
    (run,) = tmp_path.iterdir()
    m = load_model(run / "ema-0000004-0.05.safetensors")
    assert type(m).__name__ == "UNet" and m.num_classes == 10
    with torch.no_grad():
        assert m(torch.zeros(2, 1, 8, 8), 1.0, label=torch.tensor([3, 10])).shape == (2, 1, 8, 8)
