"""Every long-running command reports progress (issue 15): a bar over samples with an ETA, or phase lines,
on stderr; --quiet silences them. Tiny settings; stderr captured by click's runner."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from guidelab.app import cli
from guidelab.models.image import PixelMLP
from guidelab.training import save_model


@pytest.fixture(autouse=True)
def _no_log_handler_left():
    yield
    logger = logging.getLogger("guidelab")
    for h in [h for h in logger.handlers if getattr(h, "_guidelab", False)]:
        logger.removeHandler(h)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    torch.manual_seed(0)
    return str(save_model(d / "cond.safetensors", PixelMLP(hidden=8, depth=1, emb=4, num_classes=10)))


def _run(args):
    r = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert r.exit_code == 0, (r.output, r.exception)
    return r.stderr if r.stderr_bytes is not None else r.output


def _bar_over_samples(err: str, total: int) -> bool:
    """A tqdm bar that counts samples (not shards) to ``total``, with elapsed<remaining (the ETA)."""
    return f"{total}/{total} samples [" in err and "<" in err


def test_sample_bar_counts_samples_not_shards(tmp_path):
    err = _run(["sample", "--samples", 6, "--shard-size", 6, "--steps", 4, "--out", tmp_path / "a"])
    assert _bar_over_samples(err, 6) and "sampling" in err
    assert "using 1 CPU thread" in err and "loading the exact world A" in err  # the thread choice is logged
    assert " 0/1 " not in err  # not a bar over one shard
    quiet = _run(["sample", "--samples", 6, "--shard-size", 6, "--steps", 4, "--out", tmp_path / "b", "--quiet"])
    assert "samples [" not in quiet and "using" not in quiet


def test_sweep_one_bar_over_every_cells_samples(tmp_path):
    err = _run(["sweep", "--samples", 16, "--steps", 2, "--methods", "none,cfg", "--weights", "2,3", "--out", tmp_path])
    assert _bar_over_samples(err, 48) and "sweep (3 cells)" in err


def test_evaluate_bar_and_phase_lines(net, tmp_path):
    err = _run(["evaluate", net, "--samples", 10, "--steps", 2, "--sampler", "euler", "--out", tmp_path])
    assert _bar_over_samples(err, 10)
    assert "loading" in err and "measuring 10 samples" in err


def test_train_and_distill_show_progress(tmp_path):
    err = _run(["train", "--set", "iters=2", "--set", "hidden=8", "--set", "snapshot_every=2", "--out", tmp_path, "--no-grid"])
    assert "using 1 CPU thread" in err and "2/2" in err
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    err = _run(["distill", run, "--iters", 2, "--batch", 4, "--snapshot-every", 2, "--out", tmp_path / "d"])
    assert "2/2" in err


def test_inverse_shows_progress(tmp_path):
    from guidelab import toy

    x = toy.digits_gmm().sample(1, generator=torch.Generator().manual_seed(7)).reshape(1, 1, 8, 8)
    np.savez(tmp_path / "d.npz", x=x.numpy())
    args = ["inverse", "digits-gmm", "--task", "inpaint", "--method", "dps", "--input", tmp_path / "d.npz"]
    err = _run(args + ["--out", tmp_path / "o", "--n", 2, "--steps", 3])
    assert "using 1 CPU thread" in err and ("3/3" in err or "loading digits-gmm" in err)


def test_classifier_training_has_a_phase_line(tmp_path):
    err = _run(["classifier", "--out", tmp_path / "c.safetensors", "--steps", 2])
    assert "training the digits classifier (first use, 2 steps" in err and "weights sha256" in err
