"""Defaults per model family and the silent surprises of issue 15: --set model=UNet is a sensible U-Net,
image folders give their channels, torchrun with fewer shards than ranks warns, a large post-hoc EMA
profile error warns, thread defaults per model size."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from guidelab import threads
from guidelab.app import cli
from guidelab.app.jobs import assembly
from guidelab.data import folder_channels, image_folder
from guidelab.errors import GuidelabError
from guidelab.training.images import ImageConfig


def test_each_family_gets_its_own_size_defaults():
    assert cli._image_config({})["hidden"] == 512  # the digits PixelMLP of docs/RESULTS.md, unchanged
    unet = ImageConfig.from_dict(cli._image_config({"model": "UNet"}))
    assert unet.hidden == cli.FAMILY_DEFAULTS["UNet"]["hidden"] and unet.depth == cli.FAMILY_DEFAULTS["UNet"]["depth"]
    assert cli._image_config({"model": "UNet", "hidden": 64})["hidden"] == 64  # --set wins
    n = cli._train_parameters(unet)
    assert n is not None and n < threads.SMALL_MODEL / 2, n  # not the 149 M-parameter network of issue 15
    assert cli._train_parameters(ImageConfig.from_dict(cli._image_config({}))) > 100_000


def _folder(root, colour: bool):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        a = np.zeros((8, 8, 3), np.uint8)
        a[..., 0] = 200 if colour else 0
        Image.fromarray(a if colour else a[..., 1], "RGB" if colour else "L").save(root / c / "x.png")
    return root


def test_image_folders_give_their_channels(tmp_path):
    rgb, grey = _folder(tmp_path / "rgb", True), _folder(tmp_path / "grey", False)
    assert cli._image_config({"data": str(rgb)})["channels"] == 3
    assert cli._image_config({"data": str(grey)})["channels"] == 1
    assert cli._image_config({"data": str(rgb), "channels": 3})["channels"] == 3
    with pytest.raises(GuidelabError, match="RGB"):
        cli._image_config({"data": str(rgb), "channels": 1})
    # an RGB file whose three channels are equal is grey
    (tmp_path / "g3" / "a").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8), "RGB").save(tmp_path / "g3" / "a" / "y.png")
    assert folder_channels(tmp_path / "g3") == 1
    assert image_folder(tmp_path / "g3").images.shape[1] == 1  # the API reads the channels too
    assert image_folder(rgb).images.shape[1] == 3 and image_folder(grey).images.shape[1] == 1


def test_large_phema_profile_error_warns(caplog):
    class Net:
        checkpoint_info = {"phema_error": 0.4}

    with caplog.at_level(logging.WARNING, logger="guidelab"):
        assembly.warn_phema(Net(), "RUN")
        Net.checkpoint_info = {"phema_error": 0.01}
        assembly.warn_phema(Net(), "RUN2")
    assert "profile error 0.4" in caplog.text and "RUN2" not in caplog.text


@pytest.mark.slow
def test_torchrun_with_fewer_shards_than_ranks_warns(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "guidelab", "sample"]
    cmd += ["--samples", "6", "--steps", "2", "--out", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 shard for 2 ranks" in r.stderr and "--shard-size 3" in r.stderr
