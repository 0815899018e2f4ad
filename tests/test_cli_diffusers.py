"""``guidelab diffusers`` from the command line: the folder's own scheduler (``--schedule pipeline``), fixed
seed blocks (``--block``: the same samples at any ``--batch``), one progress bar over samples, PNG names."""

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, UNet2DModel

from guidelab.app import cli

NULL = 10  # null class id of the tiny class-conditional UNet


def _folder(tmp_path, **scheduler):
    """A tiny class-conditional UNet2DModel (8 x 8, 3 channels) with a DDIM scheduler config."""
    torch.manual_seed(0)
    folder = tmp_path / "unet"
    UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=NULL + 1,
    ).save_pretrained(folder)
    DDIMScheduler(num_train_timesteps=1000, **scheduler).save_config(folder)
    return folder


def _run(folder, out, *args):
    base = ["diffusers", str(folder), "--out", str(out), "--steps", "3", "--seeds", "3-6", "--label", "2", "--quiet"]
    return CliRunner().invoke(cli.main, [*base, *args])


def _samples(out):
    with np.load(out / "samples.npz") as f:
        return f["x"], f["seeds"].tolist()


def test_schedule_pipeline_samples_are_the_same_at_any_batch(tmp_path):
    """--schedule pipeline (DDIM with clip_sample: the folder's x0 clipping) runs; with the default --block the
    samples of batch 1 and batch 4 are bit-identical, and they differ from the karras schedule's."""
    folder = _folder(tmp_path, clip_sample=True, clip_sample_range=1.0)
    outs = {}
    for name, args in {
        "b1": ["--batch", "1"],
        "b4": ["--batch", "4"],
        "karras": ["--batch", "4", "--schedule", "karras"],
    }.items():
        schedule = [] if name == "karras" else ["--schedule", "pipeline", "--sampler", "ddim"]
        result = _run(folder, tmp_path / name, *schedule, *args)
        assert result.exit_code == 0, result.output
        outs[name] = _samples(tmp_path / name)
    (x1, s1), (x4, s4), (xk, _) = outs["b1"], outs["b4"], outs["karras"]
    assert s1 == s4 == [3, 4, 5, 6]
    assert np.array_equal(x1, x4)
    assert np.isfinite(x1).all() and not np.allclose(x1, xk, atol=1e-3)


def test_block_zero_and_bad_block(tmp_path):
    """--block 0 (batches of --batch seeds) gives the blocked samples up to float rounding; --block -1 is a
    usage error (exit 2) before anything is written."""
    folder = _folder(tmp_path)
    assert _run(folder, tmp_path / "a", "--block", "0", "--batch", "2").exit_code == 0
    assert _run(folder, tmp_path / "b", "--block", "8").exit_code == 0
    (xa, _), (xb, _) = _samples(tmp_path / "a"), _samples(tmp_path / "b")
    assert np.allclose(xa, xb, atol=1e-4)
    bad = _run(folder, tmp_path / "c", "--block", "-1")
    assert bad.exit_code == 2 and "--block" in bad.output and not (tmp_path / "c").exists()


def _families():
    """tests/integrations/test_diffusers_pipelines_families.py (its tiny pipeline builders)."""
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    sys.path.insert(0, str(Path(__file__).parent / "integrations"))
    import test_diffusers_pipelines_families as fam

    return fam


def _exit(monkeypatch, capsys, args):
    """``guidelab ARGS`` through :func:`cli.run` (the real exit code and stderr)."""
    monkeypatch.setattr("sys.argv", ["guidelab", *args])
    capsys.readouterr()  # what came before (building the folders)
    with pytest.raises(SystemExit) as e:
        cli.run()
    return e.value.code, capsys.readouterr().err


def test_generate_flux_guidance_height_width(tmp_path, monkeypatch, capsys):
    """guidelab generate on a tiny guidance-distilled FLUX folder: --guidance 3.5 is the default (same PNGs),
    --guidance 1 changes them; --height / --width set the image size; guidance as a guider option, or
    --guidance on a pipeline without that input, is one error line with exit 2."""
    from PIL import Image

    fam = _families()
    flux = fam.flux_folder(tmp_path)
    base = ["generate", str(flux), "--prompt", "a red cube", "--guider", "none", "--steps", "2", "--quiet"]
    size = ["--height", "16", "--width", "24"]
    pngs = {}
    for name, extra in {"g35": ["--guidance", "3.5"], "default": [], "g1": ["--guidance", "1"]}.items():
        result = CliRunner().invoke(cli.main, [*base, *size, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        (png,) = (p for p in (tmp_path / name).glob("*.png") if p.name != "grid.png")  # seed 0
        with Image.open(png) as im:
            pngs[name] = np.asarray(im)
    assert pngs["g35"].shape == (16, 24, 3)
    assert np.array_equal(pngs["g35"], pngs["default"]) and not np.array_equal(pngs["g35"], pngs["g1"])
    code, err = _exit(monkeypatch, capsys, [*base, "--option", "guidance=3.5", "--out", str(tmp_path / "bad")])
    assert code == 2 and "give --guidance 3.5" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    sd = fam.sd_folder(tmp_path)
    code, err = _exit(
        monkeypatch, capsys, ["generate", str(sd), "--prompt", "a", "--guidance", "2", "--quiet", "--out", str(tmp_path / "sd")]
    )
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --guidance is FLUX's distilled guidance input")
    code, err = _exit(monkeypatch, capsys, [*base, "--height", "4", "--out", str(tmp_path / "small")])
    assert code == 2 and "--height" in err


def test_one_bar_over_samples(tmp_path):
    """Without --quiet: one bar over the 4 samples (not a step bar per batch or block); one PNG per seed."""
    folder = _folder(tmp_path)
    args = ["diffusers", str(folder), "--out", str(tmp_path / "o"), "--steps", "3", "--seeds", "3-6", "--label", "2"]
    result = CliRunner().invoke(cli.main, [*args, "--batch", "1", "--block", "0"])
    assert result.exit_code == 0, result.output
    err = result.stderr if result.stderr_bytes is not None else result.output
    # one bar, over the 4 samples: every render of it counts to 4 (tqdm may draw the 100 % line twice, at the last
    # update and at close, when the machine is slow)
    assert "4/4 samples [" in err and {m[1] for m in re.findall(r"(\d+)/(\d+) samples", err)} == {"4"}
    assert " 3/3 " not in err  # no bar over the steps of a batch
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == [f"{s:09d}.png" for s in range(3, 7)]
