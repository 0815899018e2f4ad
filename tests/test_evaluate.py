"""guidelab.app.evaluate and image checkpoints in guidelab.app.jobs: tiny random networks, a few sampler steps."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from guidelab.app import cli, jobs
from guidelab.app.evaluate import evaluate
from guidelab.errors import GuidelabError
from guidelab.models.digits import DigitsClassifier
from guidelab.models.image import PixelMLP
from guidelab.training import save_model
from guidelab.training.phema import load_network

GRID = [5.0, 1.0, 0.1, 0.0]  # the "progressive student" grid below


def _net(path, **kw):
    torch.manual_seed(len(str(path)))
    net = PixelMLP(hidden=16, depth=1, emb=8, **kw)
    with torch.no_grad():  # a fresh net may have a zero output layer: perturb all
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name, kw, info in [
        ("cond", dict(num_classes=10), {}),
        ("guide", dict(num_classes=10), {}),
        ("uncond", dict(num_classes=0), {}),
        ("gft", dict(num_classes=10, extra_scalar="beta"), {"meta": {"recipe": "gft"}}),
        (
            "student",
            dict(num_classes=10, extra_scalar="w"),
            {"meta": {"distilled": {"key": "w", "sigmas": GRID, "sampler": "euler"}}},
        ),
    ]:
        paths[name] = str(save_model(d / f"{name}.safetensors", _net(d / name, **kw), **info))
    torch.manual_seed(0)
    paths["clf"] = str(save_model(d / "clf.safetensors", DigitsClassifier(channels=4, features=8)))
    paths["noisy_clf"] = str(save_model(d / "noisy.safetensors", DigitsClassifier(channels=4, features=8, noise_aware=True)))
    return paths


def _cfg(ckpts, model="cond", **kw):
    kw.setdefault("sampler", "euler")
    if model != "student":  # a distilled student samples on its own grid (--steps would be refused)
        kw.setdefault("steps", 4)
    return jobs.SampleConfig(world=None, model=ckpts[model], **kw)


def _guide(ckpts, guider):
    return {"autoguidance": ckpts["guide"], "classifier": ckpts["noisy_clf"]}.get(guider)


def test_image_sample_is_batch_size_invariant(ckpts, tmp_path):
    for guider, sampler in [("none", "euler"), ("icg", "euler_ancestral"), ("tsg", "euler")]:
        cfg = _cfg(ckpts, guider=guider, w=2.0, label="balanced", sampler=sampler)
        one = jobs.load_shards(jobs.sample(tmp_path / f"{guider}1", cfg, n=7, shard_size=1)[0].parent)
        three = jobs.load_shards(jobs.sample(tmp_path / f"{guider}3", cfg, n=7, shard_size=3)[0].parent)
        assert one["samples"].shape == (7, 1, 8, 8) and np.array_equal(one["samples"], three["samples"])
        assert one["labels"].tolist() == [s % 10 for s in range(7)] == three["labels"].tolist()


MODEL_OF = {"gft": "gft", "distilled": "student"}
OPTIONS_OF = {
    "perp_neg": {"negative": 3},  # perp_neg needs the class to steer away from
    # CADS noises the condition at any w (annealed sampling, not a weight): its neutral setting is tau1 >= 1
    "cads": {"tau1": 1.0},
}


@pytest.mark.parametrize("guider", [g for g in jobs.GUIDERS if g not in ("none", "cfgpp")])  # cfgpp: w is lambda
def test_every_guider_builds_and_w1_is_unguided(ckpts, guider):
    model = MODEL_OF.get(guider, "cond")
    seeds = [3, 4, 5]
    plain = jobs.build(_cfg(ckpts, model, label="balanced")).generate(seeds)
    cfg = _cfg(
        ckpts, model, guider=guider, guide=_guide(ckpts, guider), label="balanced", guider_options=OPTIONS_OF.get(guider, {})
    )
    w1 = jobs.build(cfg).generate(seeds)
    w3 = jobs.build(jobs.SampleConfig(**{**cfg.__dict__, "w": 3.0})).generate(seeds)
    assert np.array_equal(w1, plain)  # w = 1 is no guidance, bit for bit
    assert not np.allclose(w3, plain)
    # an interval that holds every sigma of the schedule is the guider itself; one that holds none is w = 1
    inside = jobs.build(jobs.SampleConfig(**{**cfg.__dict__, "w": 3.0, "interval": (0.0, 100.0)})).generate(seeds)
    outside = jobs.build(jobs.SampleConfig(**{**cfg.__dict__, "w": 3.0, "interval": (90.0, 100.0)})).generate(seeds)
    assert np.array_equal(inside, w3) and np.array_equal(outside, plain)


def test_nfe_is_counted_and_a_student_samples_on_its_own_grid(ckpts, tmp_path):
    rows = lambda cfg: jobs.load_shards(
        jobs.sample(
            tmp_path / str(len(list(tmp_path.iterdir()))),
            cfg,  # noqa: E731
            n=4,
            shard_size=3,
        )[0].parent
    )["rows"]
    assert rows(_cfg(ckpts, label=1, sampler="heun", steps=5)) == {"model": 4 * 9}  # Heun: 2 S - 1
    assert rows(_cfg(ckpts, label=1, guider="cfg", w=2.0)) == {"model": 4 * 2 * 4}  # batched: 2 per step
    assert rows(_cfg(ckpts, label=1, guider="autoguidance", guide=ckpts["guide"], w=2.0)) == {"model": 16, "guide": 16}
    assert rows(_cfg(ckpts, label=1, guider="gft", model="gft", w=2.0)) == {"model": 16}  # one pass
    job = jobs.build(_cfg(ckpts, "student", guider="distilled", w=2.0, label=0, sampler=None, steps=32))
    assert job.sampler == "euler" and torch.equal(job.sigmas, torch.tensor(GRID))  # its grid, not karras(32)
    job.generate([0, 1])
    assert job.counts == {"model": 2 * 3}


def test_png_files_and_resume(ckpts, tmp_path):
    args = [
        "sample",
        "--model",
        ckpts["cond"],
        "--label",
        "balanced",
        "--samples",
        "5",
        "--shard-size",
        "2",
        "--sampler",
        "euler",
        "--steps",
        "3",
        "--png",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code == 0, r.output
    x, _ = jobs.load_samples(tmp_path)
    files = sorted((tmp_path / "png").glob("*.png"))
    assert [f.name for f in files] == [f"{s:09d}.png" for s in range(5)]
    for f, xi in zip(files, x):
        im = Image.open(f)
        assert im.mode == "L" and im.size == (8, 8)
        assert np.array_equal(np.asarray(im), np.clip(np.round((xi[0].astype(np.float64) + 1) * 127.5), 0, 255))
    before = {f.name: f.read_bytes() for f in files}
    files[1].unlink()  # killed between PNGs ...
    (tmp_path / "shard-000000004-000000004.npz").unlink()  # ... or before the last shard
    files[4].unlink()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a writer that is gone: its temp is stale
    (tmp_path / "png" / f".000000004.png.tmp{dead.pid}.XYZ").write_bytes(b"partial")
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code == 0, r.output
    assert {f.name: f.read_bytes() for f in sorted((tmp_path / "png").iterdir())} == before


def test_evaluate_writes_metrics_and_a_class_grid(ckpts, tmp_path):
    cfg = _cfg(ckpts, guider="cfg", w=2.0)
    res = evaluate(tmp_path, cfg, n=30, shard_size=16, classifier=ckpts["clf"])
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "fd",
        "class_accuracy",
        "precision",
        "recall",
        "density",
        "coverage",
        "nfe",
        "sampling_seconds",
        "extractor",
        "weights_sha256",
        "seeds",
        "n",
        "sampler",
        "steps",
        "guider",
        "w",
        "model",
        "label",
        "fd_train_vs_test",
        "classifier",
    ):
        assert key in on_disk, key
    assert on_disk == json.loads(json.dumps(res))
    assert on_disk["label"] == "balanced" and on_disk["seeds"] == "0-29" and on_disk["n"] == 30
    assert on_disk["nfe"] == 8 and on_disk["guider"] == "cfg" and on_disk["model"]["path"] == ckpts["cond"]
    assert on_disk["weights_sha256"] == DigitsClassifier.weights_sha256(load_network(ckpts["clf"]))
    assert 0 <= on_disk["class_accuracy"] <= 1 and on_disk["fd"] > 0 and sum(on_disk["class_histogram"]) == 30
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (10 * 34, 10 * 34)  # 10 classes x 10 samples, 8 px x 4 + 2 px gap
    # a rerun reuses the shards and measures the same samples
    assert evaluate(tmp_path, cfg, n=30, shard_size=16, classifier=ckpts["clf"])["fd"] == res["fd"]


def _error(args):
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code != 0 and isinstance(r.exception, GuidelabError), r.output
    msg = str(r.exception)
    assert "\n" not in msg
    return msg


def test_bad_input_is_one_line(ckpts, tmp_path):
    out = ["--out", str(tmp_path / "x")]
    assert "unknown guider 'magic'" in _error(["evaluate", ckpts["cond"], "--guider", "magic", *out])
    assert "recipe=gft" in _error(["evaluate", ckpts["cond"], "--guider", "gft", "--weight", "2", *out])
    assert "distilled student" in _error(["sample", "--model", ckpts["cond"], "--guider", "distilled", *out])
    assert "checkpoint not found" in _error(["evaluate", str(tmp_path / "missing.safetensors"), *out])
    assert "unconditional" in _error(["sample", "--model", ckpts["uncond"], "--label", "3", *out])
    assert "null label" in _error(["sample", "--model", ckpts["uncond"], "--guider", "cfg", *out])
    assert "integer or 'balanced'" in _error(["sample", "--model", ckpts["cond"], "--label", "seven", *out])
    assert "--png needs an image model" in _error(["sample", "--png", *out])
    assert not (tmp_path / "x").exists()  # nothing written for a refused job
    r = subprocess.run(
        [sys.executable, "-m", "guidelab", "evaluate", ckpts["gft"], "--guider", "cfg", *out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = r.stderr.strip().splitlines()
    # one error line, last; before it at most the held phase lines (printed when loading took > cli.HOLD s)
    assert r.returncode == 2 and "use --guider gft" in lines[-1] and sum("error" in line for line in lines) == 1
    assert "Traceback" not in r.stderr


def test_sweep_on_a_tiny_digits_model(ckpts, tmp_path):
    r = CliRunner().invoke(
        cli.main,
        [
            "sweep",
            "--out",
            str(tmp_path),
            "--model",
            ckpts["cond"],
            "--methods",
            "none,cfg,icg",
            "--weights",
            "1,3",
            "--samples",
            "20",
            "--sampler",
            "euler",
            "--steps",
            "3",
            "--classifier",
            ckpts["clf"],
            "--quality",
            "class_accuracy",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {row["cell"]: row for row in res["rows"]}
    assert list(rows) == ["none_w1", "cfg_w1", "cfg_w3", "icg_w1", "icg_w3"]
    for k in ("fd", "class_accuracy", "precision", "recall", "density", "coverage"):
        assert rows["none_w1"][k] == rows["cfg_w1"][k] == rows["icg_w1"][k]  # w = 1: the same samples
    assert rows["cfg_w3"]["fd"] != rows["none_w1"]["fd"] and rows["cfg_w3"]["nfe"] == 6 == 2 * rows["none_w1"]["nfe"]
    assert rows["none_w1"]["extractor"] == "digits-classifier" and res["reference"]["fd_train_vs_test"] > 0
    assert set(res["pareto"]) <= set(rows) and set(res["best"]) == {"none", "cfg", "icg"}
