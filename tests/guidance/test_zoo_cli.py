"""Guidance zoo II from the CLI on the exact tree world: every rule name with numbers and --weight schedules
(sample), w = 1 bit-identical to no guidance, schedules in a sweep with its NFE per cell and a report,
fdg on an image model and refused (nothing written) on 2-D points. tests/test_registry.py covers each name
once at a number weight on a digits-sized network; this file covers schedules, sweeps and reports."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from guidelab.app import cli, jobs
from guidelab.errors import GuidelabError
from guidelab.guidance import registry

#: rule -> the CLI options its defining setting needs on the tree (labels 0 = A, 1 = B)
ZOO = {
    "tcfg": [],
    "cfg_norm": ["--option", "per=sample"],
    "mag": ["--option", "alpha=1"],
    "dynamic_thresholding": ["--option", "max_value=1"],
    "apg": ["--option", "eta=0"],
}
WEIGHTS = ["3", "linear:1-4", "cosine:4-1:over=sigma", "steps:3-1:start=1,stop=2", "interval:3-1:sigma_lo=0.3,sigma_hi=2"]
STEPS = 4


def _invoke(args):
    return CliRunner().invoke(cli.main, args)


def _sample(out, guider, weight, extra=()):
    args = ["sample", "--world", "A", "--samples", "16", "--steps", str(STEPS), "--quiet", "--out", str(out)]
    r = _invoke([*args, "--guider", guider, "--weight", weight, *extra])
    assert r.exit_code == 0, (guider, weight, r.output, r.exception)
    return jobs.load_samples(out)[0]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _sample(tmp_path_factory.mktemp("none") / "s", "none", "1")


@pytest.mark.parametrize("name", list(ZOO))
def test_each_rule_samples_with_numbers_and_schedules(plain, tmp_path, name):
    assert np.array_equal(_sample(tmp_path / "one", name, "1", ZOO[name]), plain)  # w = 1: no guidance, bit for bit
    seen = []
    for i, weight in enumerate(WEIGHTS):
        got = _sample(tmp_path / f"s{i}", name, weight, ZOO[name])
        assert got.shape == plain.shape and np.isfinite(got).all()
        assert not np.allclose(got, plain), weight  # the rule guided
        assert all(not np.array_equal(got, s) for s in seen), weight  # each schedule is its own weight
        seen.append(got)


def test_constant_schedule_is_the_number(tmp_path):
    for name in ("cfg", "tcfg"):
        a = _sample(tmp_path / f"{name}n", name, "3", ZOO.get(name, []))
        b = _sample(tmp_path / f"{name}c", name, "constant:3", ZOO.get(name, []))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_rules_and_schedules_sweep_with_their_nfe_and_report(tmp_path):
    out, names = tmp_path / "sweep", list(ZOO)
    weights = ["1", "2", "linear:1-4", "steps:2-1:start=1,stop=2"]
    r = _invoke(
        ["sweep", "--out", str(out), "--methods", ",".join(["none", *names]), "--weights", ",".join(weights)]
        + ["--samples", "16", "--steps", str(STEPS), "--quiet"]
    )
    assert r.exit_code == 0, (r.output, r.exception)
    rows = json.loads((out / "results.json").read_text())["rows"]
    by = {(row["method"], str(row["weight"])): row for row in rows}
    base = by[("none", "1")]["nfe"]
    assert base == 2 * STEPS - 1  # Heun on STEPS steps
    for name in names:
        assert by[(name, "1")]["nfe"] == base  # w = 1: the main branch alone
        for weight in weights[1:]:  # schedules evaluate every branch at every step (also where w = 1)
            assert by[(name, weight)]["nfe"] == registry.get(name).nfe * base, (name, weight)
            assert np.isfinite(by[(name, weight)]["fd"])


def _sweep_and_report(out, weights):
    r = _invoke(
        ["sweep", "--out", str(out), "--methods", "none,tcfg", "--weights", weights, "--samples", "16"]
        + ["--steps", str(STEPS), "--quiet"]
    )
    assert r.exit_code == 0, (r.output, r.exception)
    r = _invoke(["report", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert (out / "report.html").stat().st_size > 0


def test_a_sweep_over_schedules_reports(tmp_path):
    _sweep_and_report(tmp_path / "s", "1,linear:1-4,cosine:4-1")


def test_a_sweep_over_schedules_with_options_reports(tmp_path):
    _sweep_and_report(tmp_path / "s", "steps:2-1:start=1,stop=2")


def test_fdg_and_perp_neg_take_schedules_on_images_fdg_refuses_points(tmp_path):
    import torch

    from guidelab.training import save_model
    from test_evaluate import _net  # tests/ is on sys.path: the same tiny PixelMLP as test_registry

    torch.manual_seed(0)
    ckpt = str(save_model(tmp_path / "cond.safetensors", _net(tmp_path / "n", num_classes=10)))
    args = ["sample", "--model", ckpt, "--label", "balanced", "--samples", "3", "--sampler", "euler", "--steps", "3"]
    outs = {}
    for weight, opts in (("1", []), ("linear:1-4", ["--option", "w_low=1"]), ("linear:1-4", ["--option", "w_low=4"])):
        out = tmp_path / f"fdg{len(outs)}"
        r = _invoke([*args, "--quiet", "--out", str(out), "--guider", "fdg", "--weight", weight, *opts])
        assert r.exit_code == 0, (weight, r.output, r.exception)
        outs[(weight, *opts)] = jobs.load_samples(out)[0]
    r = _invoke([*args, "--quiet", "--out", str(tmp_path / "none"), "--guider", "none"])
    assert r.exit_code == 0
    assert np.array_equal(outs[("1",)], jobs.load_samples(tmp_path / "none")[0])
    low1, low4 = outs[("linear:1-4", "--option", "w_low=1")], outs[("linear:1-4", "--option", "w_low=4")]
    assert np.isfinite(low1).all() and not np.allclose(low1, low4)  # the low band's weight acts
    pn = {}
    for guider, opts in (("cfg", []), ("perp_neg", ["neg_w=0"]), ("perp_neg", ["neg_w=1"])):
        out = tmp_path / f"pn{len(pn)}"
        opts = [a for o in ([*opts, "negative=3"] if guider == "perp_neg" else []) for a in ("--option", o)]
        r = _invoke([*args, "--quiet", "--out", str(out), "--guider", guider, "--weight", "linear:1-4", *opts])
        assert r.exit_code == 0, (guider, r.output, r.exception)
        pn[len(pn)] = jobs.load_samples(out)[0]
    assert np.array_equal(pn[1], pn[0])  # neg_w = 0: the base guider itself
    assert np.isfinite(pn[2]).all() and not np.allclose(pn[2], pn[0])  # the negative acts
    r = _invoke(
        ["sample", "--world", "A", "--samples", "4", "--steps", "3", "--out", str(tmp_path / "pts")]
        + ["--guider", "fdg", "--weight", "linear:1-4"]
    )
    assert isinstance(r.exception, GuidelabError) and "fdg needs [B, C, L] or [B, C, H, W]" in str(r.exception)
    assert not (tmp_path / "pts").exists()  # refused before anything is written


def test_cads_from_the_cli_on_a_label_network(tmp_path):
    import inspect

    import torch

    from guidelab.guidance import cads
    from guidelab.training import save_model
    from test_evaluate import _net

    defaults = inspect.signature(cads).parameters
    assert {o.name: o.default for o in registry.get("cads").options if o.name != "base"} == {
        k: defaults[k].default for k in ("tau1", "tau2", "noise_scale", "psi")
    }
    torch.manual_seed(0)
    ckpt = str(save_model(tmp_path / "cond.safetensors", _net(tmp_path / "n", num_classes=10)))
    args = ["sample", "--model", ckpt, "--label", "balanced", "--samples", "3", "--sampler", "euler", "--steps", "4"]
    got = {}
    for tag, guider, weight, opts in (
        ("cfg", "cfg", "2", []),
        ("cads", "cads", "2", []),
        ("off", "cads", "2", ["--option", "tau1=1"]),
        ("sched", "cads", "linear:1-4", ["--option", "noise_scale=0.5"]),
    ):
        r = _invoke([*args, "--quiet", "--out", str(tmp_path / tag), "--guider", guider, "--weight", weight, *opts])
        assert r.exit_code == 0, (tag, r.output, r.exception)
        got[tag] = jobs.load_samples(tmp_path / tag)[0]
    assert np.array_equal(got["off"], got["cfg"])  # tau1 >= 1: the base guider, bit for bit
    assert not np.allclose(got["cads"], got["cfg"]) and np.isfinite(got["sched"]).all()
    r = _invoke(["sample", "--world", "A", "--samples", "4", "--steps", "3", "--out", str(tmp_path / "pts"), "--guider", "cads"])
    assert isinstance(r.exception, GuidelabError) and "cads needs" in str(r.exception)
    assert not (tmp_path / "pts").exists()
