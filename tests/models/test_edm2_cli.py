"""EDM2 on the command line: convert-edm2, sample --preset --models (a .pkl guide included), --vae decoding."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_edm2_pickle import write_pkl
from test_edm2_presets import _net as tiny_net

from guidelab.app import cli
from guidelab.app.jobs import load_shards
from guidelab.errors import GuidelabError
from guidelab.models import edm2
from guidelab.training import load_model, save_model


def _net(label_dim, channels, seed, img_channels=3):
    return tiny_net(label_dim, channels, seed, img_channels=img_channels, gain_std=0.5)


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def refused(r, text):
    """The command stopped on a GuidelabError (the entry point prints it, exit code 2) saying ``text``."""
    return isinstance(r.exception, GuidelabError) and text in str(r.exception)


def test_convert_edm2(tmp_path):
    net = _net(10, 8, 0)
    write_pkl(tmp_path / "a.pkl", net)
    r = run("convert-edm2", tmp_path / "a.pkl", "--out", tmp_path / "a.safetensors")
    assert r.exit_code == 0, r.output
    back = load_model(tmp_path / "a.safetensors")
    x, sigma, y = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0]), torch.tensor([1, 2])
    assert torch.equal(back(x, sigma, class_labels=y), net(x, sigma, class_labels=y))
    assert back.checkpoint_info["encoder"]["class_name"] == "StandardRGBEncoder"
    r = run("convert-edm2", tmp_path / "missing.pkl", "--out", tmp_path / "b.safetensors")
    assert refused(r, "cannot read")


def test_sample_preset_from_local_files(tmp_path):
    p = edm2.PRESETS["edm2-img64-s-autog-fid"]
    models = tmp_path / "models"
    models.mkdir()
    save_model(models / f"{p.net}.safetensors", _net(10, 16, 0))
    r = run("sample", "--preset", p.name, "--models", models, "--out", tmp_path / "x")
    assert refused(r, f"needs {p.gnet}.pkl")  # the missing guide, by name
    write_pkl(models / f"{p.gnet}.pkl", _net(10, 8, 1))  # an NVlabs pickle as the guide
    common = ["--samples", 3, "--steps", 3, "--shard-size", 3, "--quiet"]
    r = run("sample", "--preset", p.name, "--models", models, "--out", tmp_path / "preset", *common)
    assert r.exit_code == 0, r.output
    explicit = [
        "--model",
        models / f"{p.net}.safetensors",
        "--guide",
        models / f"{p.gnet}.pkl",
        "--guider",
        "autoguidance",
        "--weight",
        1.7,
        "--label",
        "balanced",
    ]
    r = run("sample", *explicit, "--out", tmp_path / "explicit", *common)
    assert r.exit_code == 0, r.output
    a, b = load_shards(tmp_path / "preset"), load_shards(tmp_path / "explicit")
    assert a["samples"].shape == (3, 3, 8, 8) and np.array_equal(a["samples"], b["samples"])
    assert list(a["labels"]) == [0, 1, 2] and a["rows"]["guide"] > 0
    r = run("sample", "--preset", p.name, "--models", models, "--weight", 1, "--out", tmp_path / "w1", *common)
    plain = run("sample", "--model", models / f"{p.net}.safetensors", "--label", "balanced", "--out", tmp_path / "plain", *common)
    assert r.exit_code == 0 and plain.exit_code == 0, r.output + plain.output
    assert np.array_equal(load_shards(tmp_path / "w1")["samples"], load_shards(tmp_path / "plain")["samples"])
    r = run("sample", "--preset", p.name, "--models", models, "--model", "m.safetensors", "--out", tmp_path / "y")
    assert refused(r, "drop --model")


def test_sample_latent_preset_decodes_through_a_local_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    p = edm2.PRESETS["edm2-img512-xs-guid-fid"]
    models = tmp_path / "models"
    models.mkdir()
    save_model(models / f"{p.net}.safetensors", _net(10, 8, 0, img_channels=4))
    save_model(models / f"{p.gnet}.safetensors", _net(0, 8, 1, img_channels=4))
    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(tmp_path / "vae")
    r = run(
        "sample",
        "--preset",
        p.name,
        "--models",
        models,
        "--vae",
        tmp_path / "vae",
        "--out",
        tmp_path / "o",
        "--samples",
        2,
        "--steps",
        2,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    z = load_shards(tmp_path / "o")
    assert z["samples"].shape == (2, 4, 8, 8) and z["rows"]["guide"] > 0
    pngs = sorted((tmp_path / "o" / "png").glob("*.png"))
    assert len(pngs) == 2 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    codec = edm2.VAELatents(edm2.load_vae(tmp_path / "vae"))
    want = codec.decode(torch.from_numpy(z["samples"][:1]))[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(pngs[0])), want)
