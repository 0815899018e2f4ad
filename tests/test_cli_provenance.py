"""Provenance in every output file (issue 15 item 6): job.json, metrics.json (evaluate, demo), results.json
and the PNGs (text chunks) record version, commit, command line, model files with sha256, sampler, steps,
schedule, seeds, guider, weight, torch and device -- one flat dict of strings under ``provenance``."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import guidelab
from guidelab._io import sha256
from guidelab.app import cli, provenance
from guidelab.models.digits import DigitsClassifier
from guidelab.models.image import PixelMLP
from guidelab.training import save_model

SAMPLING = ("sampler", "steps", "schedule", "seeds", "guider", "weight")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prov")
    torch.manual_seed(0)
    net = PixelMLP(hidden=8, depth=1, emb=4, num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return {
        "model": str(save_model(d / "cond.safetensors", net)),
        "clf": str(save_model(d / "clf.safetensors", DigitsClassifier(channels=4, features=8))),
    }


def _check(prov: dict, *, model: str | None = None, sampling: bool = True, command: str = ""):
    assert isinstance(prov, dict) and prov and all(isinstance(k, str) and isinstance(v, str) for k, v in prov.items())
    assert prov["guidelab_version"] == guidelab.__version__ and prov["torch"] == torch.__version__
    assert prov["git_commit"] and prov["device"] and prov["python"]
    assert prov["cpu"] == provenance.cpu() and torch.backends.cpu.get_cpu_capability() in prov["cpu"]
    assert prov["command"].startswith("guidelab ") and command in prov["command"]
    if model is not None:
        assert prov["model"] == model and prov["model_sha256"] == sha256(model)
    if sampling:
        missing = [k for k in SAMPLING if k not in prov]
        assert not missing, missing


def _run(args):
    r = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert r.exit_code == 0, (r.output, r.exception)


def test_sample_job_json_and_pngs(files, tmp_path):
    out = tmp_path / "s"
    _run(
        ["sample", "--model", files["model"], "--samples", 3, "--steps", 2, "--png", "--quiet", "--guider", "cfg"]
        + ["--weight", "linear:1-2", "--label", "3", "--out", out]
    )
    job = json.loads((out / "job.json").read_text())
    _check(job["provenance"], model=files["model"], command="--weight linear:1-2")
    assert job["provenance"]["seeds"] == "0-2" and job["provenance"]["weight"] == "linear:1-2"
    png = provenance.read_png(out / "png" / "000000001.png")
    _check(png, model=files["model"])
    assert png["seeds"] == "1"  # each image names its own seed
    _run(
        ["sample", "--model", files["model"], "--samples", 3, "--steps", 2, "--png", "--quiet", "--guider", "cfg"]
        + ["--weight", "linear:1-2", "--label", "3", "--out", out]
    )  # a resume from another command line: accepted


def test_evaluate_metrics_json_and_grid(files, tmp_path):
    _run(["evaluate", files["model"], "--samples", 10, "--steps", 2, "--classifier", files["clf"], "--quiet", "--out", tmp_path])
    m = json.loads((tmp_path / "metrics.json").read_text())
    _check(m["provenance"], model=files["model"], command="evaluate")
    assert m["provenance"]["classifier"] == files["clf"]
    _check(provenance.read_png(tmp_path / "grid.png"), model=files["model"])


def test_sweep_results_json(tmp_path):
    _run(["sweep", "--samples", 16, "--steps", 2, "--methods", "none,cfg", "--weights", "2", "--quiet", "--out", tmp_path])
    res = json.loads((tmp_path / "results.json").read_text())
    _check(res["provenance"], command="sweep")
    assert res["provenance"]["guider"] == "none,cfg" and res["provenance"]["world"] == "A"
    _check(json.loads((tmp_path / "samples" / "cfg_w2" / "job.json").read_text())["provenance"])


def test_flat_strings_and_seed_text():
    p = provenance.collect(device="cpu", steps=32, interval=[0.3, 5.0], options={"b": 1, "a": 2}, skipped=None)
    assert p["steps"] == "32" and p["interval"] == "[0.3, 5.0]" and p["options"] == '{"a": 2, "b": 1}' and "skipped" not in p
    assert provenance.seeds_text(range(5, 9)) == "5-8" and provenance.seeds_text([3, 1]) == "3,1"
