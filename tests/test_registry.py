"""The guider registry (guidance.registry): every name works from the CLI where its needs are met, an unmet
need or a bad option is one clear error, options are typed, and adding a guider is one entry."""

import inspect
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from guidelab import guidance
from guidelab.app import cli, jobs
from guidelab.errors import GuidelabError
from guidelab.guidance import registry
from guidelab.models.digits import DigitsClassifier
from guidelab.training import save_model
from test_evaluate import _net  # tests/ is on sys.path (rootdir imports): the same tiny PixelMLP


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("reg")
    torch.manual_seed(0)
    paths = {
        name: str(save_model(d / f"{name}.safetensors", _net(d / name, **kw), **info))
        for name, kw, info in [
            ("cond", dict(num_classes=10), {}),
            ("guide", dict(num_classes=10), {}),
            ("blind", dict(num_classes=10, noise_cond=False), {}),
            ("gft", dict(num_classes=10, extra_scalar="beta"), {"meta": {"recipe": "gft"}}),
            ("student", dict(num_classes=10, extra_scalar="w"), {"meta": {"distilled": {"key": "w"}}}),
        ]
    }
    paths["noisy_clf"] = str(save_model(d / "noisy.safetensors", DigitsClassifier(channels=4, features=8, noise_aware=True)))
    return paths


#: guider -> (model, extra CLI arguments, weight) meeting its needs
SETUP = {
    "autoguidance": ("cond", ["--guide", "guide"], 2.0),
    "classifier": ("cond", ["--guide", "noisy_clf"], 2.0),
    "gft": ("gft", [], 2.0),
    "distilled": ("student", [], 2.0),
    "cfgpp": ("cond", [], 0.5),
    "apg": ("cond", ["--option", "eta=0.5", "--option", "r=4"], 2.0),
    "rescale": ("cond", ["--option", "phi=0.5", "--option", "base=cfg"], 2.0),
    "tsg": ("cond", ["--option", "s=0.3", "--option", "alpha=0"], 2.0),
    "perp_neg": ("cond", ["--option", "negative=3"], 2.0),
}


def _sample(ckpts, out, guider, w, model="cond", extra=()):
    extra = [ckpts.get(a, a) for a in extra]
    args = [
        "sample",
        "--model",
        ckpts[model],
        "--guider",
        guider,
        "--weight",
        str(w),
        "--label",
        "balanced",
        "--samples",
        "3",
        "--sampler",
        "euler",
        "--steps",
        "3",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code == 0, (guider, r.output, r.exception)
    return jobs.load_samples(out)[0]


@pytest.mark.parametrize("guider", [g for g in jobs.GUIDERS if g != "none"])
def test_every_guider_samples_from_the_cli_where_its_needs_are_met(ckpts, tmp_path, guider):
    model, extra, w = SETUP.get(guider, ("cond", [], 2.0))
    plain = _sample(ckpts, tmp_path / "plain", "none", 1.0, model)
    guided = _sample(ckpts, tmp_path / "guided", guider, w, model, extra)
    assert guided.shape == plain.shape == (3, 1, 8, 8) and np.isfinite(guided).all()
    assert not np.allclose(guided, plain)  # the guider acted


def test_jobs_and_cli_offer_exactly_the_registry():
    assert jobs.GUIDERS == tuple(n for n in registry.names() if "attention" not in registry.get(n).needs)
    assert set(cli.DIFFUSERS_GUIDERS) >= {"none", "cfg", "autoguidance", "icg", "tsg", "apg", "pag", "seg", "slg"}
    assert not {"gft", "distilled", "classifier"} & set(cli.DIFFUSERS_GUIDERS)
    sample = next(p for p in cli.main.commands["sample"].params if p.name == "guider")
    assert list(sample.type.choices) == list(jobs.GUIDERS)
    for name in jobs.GUIDERS:  # help text from the summaries
        assert registry.get(name).summary in sample.help


def test_guiders_command_lists_the_registry():
    r = CliRunner().invoke(cli.main, ["guiders"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert [ln.split()[0] for ln in lines] == registry.names()
    assert "nfe 2  needs noise_embed  options s=" in lines[registry.names().index("tsg")]


def test_unmet_needs_are_one_clear_error_each():
    torch.manual_seed(0)
    plain, blind = _net("plain"), _net("blind", num_classes=10, noise_cond=False)
    cases = [
        ("cfg", registry.Context(plain), "cfg needs a class-conditional network"),
        ("autoguidance", registry.Context(_net("cond", num_classes=10)), "autoguidance needs --guide"),
        ("icg", registry.Context(plain), "icg needs a conditional network"),
        ("tsg", registry.Context(blind), "tsg needs a network with a noise-level embedding"),
        ("classifier", registry.Context(plain), "classifier needs a noise-aware classifier"),
        ("gft", registry.Context(plain), "recipe=gft"),
        ("distilled", registry.Context(plain), "distilled student"),
        ("pag", registry.Context(plain), "pag needs a diffusers model"),
        ("apg", registry.Context(plain, options={"base": "autoguidance"}), "apg needs --guide"),
        ("cfg", registry.Context(_net("gft", num_classes=10, extra_scalar="beta")), "use --guider gft"),
    ]
    for name, ctx, msg in cases:
        with pytest.raises(GuidelabError, match=msg) as e:
            registry.build(name, ctx)
        assert "\n" not in str(e.value)
    # two unmet needs: both named, in one line
    problems = registry.unmet("cfg", registry.Context(_net("student", extra_scalar="w")))
    assert len(problems) == 2 and "null label" in problems[0] and "extra scalar" in problems[1]


def test_options_are_typed_and_checked():
    assert registry.parse_options("tsg", ["s=0.3", "alpha=0", "dim=16", "form=scalar"]) == {
        "s": 0.3,
        "alpha": 0.0,
        "dim": 16,
        "form": "scalar",
    }
    assert registry.parse_options("apg", {"r": "none", "beta": -0.5, "base": "icg"}) == {"r": None, "beta": -0.5, "base": "icg"}
    assert registry.parse_options("pag", ["layers=mid, up.0", "cfg_weight=3"]) == {"layers": ("mid", "up.0"), "cfg_weight": 3.0}
    assert registry.parse_options("seg", ["layers=mid,up.0", "blur_sigma=inf"]) == {
        "layers": ("mid", "up.0"),
        "blur_sigma": math.inf,
    }
    for name, opts, msg in [
        ("tsg", ["s=abc"], "tsg option s must be a float, got 'abc'"),
        ("tsg", ["q=1"], "tsg takes no option q; allowed: s, alpha, form, dim"),
        ("cfg", ["s=1"], "cfg takes no option s; allowed: none"),
        ("icg", ["num_classes=2.5"], "icg option num_classes must be an integer"),
        ("rescale", ["space=pixels"], "rescale option space must be one of v, eps, x0"),
        ("apg", ["base=classifier"], "apg option base must be one of cfg, autoguidance, icg, tsg"),
        ("tsg", ["s"], "--option takes KEY=VALUE"),
        ("tsg", {"s": None}, "tsg option s cannot be None"),
        ("magic", [], "unknown guider 'magic'; allowed: none, cfg"),
    ]:
        with pytest.raises(GuidelabError, match=msg):
            registry.parse_options(name, opts)


def test_option_defaults_are_the_guidance_functions_own():
    fns = {
        "icg": guidance.icg,
        "tsg": guidance.tsg,
        "apg": guidance.apg,
        "rescale": guidance.rescale,
        "cfg_zero_star": guidance.cfg_zero_star,
    }
    for name, fn in fns.items():
        params = inspect.signature(fn).parameters
        for o in registry.get(name).options:
            if o.name != "base":
                assert o.default == params[o.name].default, (name, o.name)


def test_bad_option_from_the_cli_is_one_line(ckpts, tmp_path):
    r = CliRunner().invoke(
        cli.main, ["sample", "--model", ckpts["cond"], "--guider", "tsg", "--option", "s=abc", "--out", str(tmp_path / "x")]
    )
    assert isinstance(r.exception, GuidelabError) and str(r.exception) == "tsg option s must be a float, got 'abc'"
    r = CliRunner().invoke(cli.main, ["sample", "--model", ckpts["blind"], "--guider", "tsg", "--out", str(tmp_path / "x")])
    assert isinstance(r.exception, GuidelabError) and "noise-level embedding" in str(r.exception)
    assert not (tmp_path / "x").exists()


def test_sampler_needs_are_checked_before_sampling(ckpts, tmp_path):
    from guidelab import samplers

    torch.manual_seed(0)
    net = _net("cond", num_classes=10)
    can = [s for s in samplers.names() if "renoise" in samplers.info(s).supports]
    assert "euler" in can and "heun" in can and "dpm_2" not in can
    with pytest.raises(GuidelabError, match=f"cfgpp needs a sampler with renoise: {', '.join(can)}; got dpm_2"):
        registry.build("cfgpp", registry.Context(net, 0.5, sampler="dpm_2"))
    registry.build("cfgpp", registry.Context(net, 0.5, sampler="euler"))
    r = CliRunner().invoke(
        cli.main,
        [
            "sample",
            "--model",
            ckpts["cond"],
            "--guider",
            "cfgpp",
            "--weight",
            "0.5",
            "--sampler",
            "dpm_2",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert isinstance(r.exception, GuidelabError) and "renoise" in str(r.exception)
    assert not (tmp_path / "x").exists()  # refused before anything is written
    base = ["sample", "--model", ckpts["cond"], "--guider", "cfgpp", "--weight", "0.5", "--samples", "8", "--steps", "4"]
    for sampler in ("heun", "euler"):  # heun takes CFG++ from the CLI too (its renoise form)
        r = CliRunner().invoke(cli.main, [*base, "--sampler", sampler, "--quiet", "--out", str(tmp_path / sampler)])
        assert r.exit_code == 0, r.output
    heun, euler = (sorted((tmp_path / s).rglob("*.npz")) for s in ("heun", "euler"))
    assert heun and euler and not np.array_equal(np.load(heun[0])["samples"], np.load(euler[0])["samples"])


def test_rules_take_a_base_guider(ckpts):
    torch.manual_seed(0)
    net, guide = _net("main", num_classes=10), _net("guide", num_classes=10)
    x, sigma, y = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([1, 2])
    ctx = registry.Context(net, 2.0, guide=guide, options={"base": "autoguidance", "phi": 0.0})
    # rescale with phi = 0 is its base guider exactly
    ref = guidance.autoguidance(net, guide, 2.0)(x, sigma, label=y)
    torch.testing.assert_close(registry.build("rescale", ctx)(x, sigma, label=y), ref)


def test_interval_applies_to_any_entry_and_parses_exponents():
    assert cli._interval("1e-3-5") == (0.001, 5.0)
    assert cli._interval("0.3-5") == (0.3, 5.0) and cli._interval("2E+1-inf") == (20.0, math.inf)
    for bad in ("1e-3", "5-", "a-b", "1-2-3"):
        with pytest.raises(GuidelabError, match="lo-hi"):
            cli._interval(bad)
    net = _net("cond", num_classes=10)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    den = registry.build("cfg", registry.Context(net, 3.0, interval=(0.5, 2.0)))
    inside, outside = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])
    torch.testing.assert_close(den(x, inside, label=y), guidance.cfg(net, 3.0)(x, inside, label=y))
    torch.testing.assert_close(den(x, outside, label=y), net(x, outside, label=y))


def test_a_new_guider_is_one_entry(monkeypatch):
    def build(ctx):  # a made-up linear guider: main vs the same net at 2 sigma
        return guidance.Guided(
            guidance.Branch(ctx.main), guidance.Branch(lambda x, s, **c: ctx.main(x, 2 * s, **c)), ctx.w, "blurry"
        )

    spec = registry.GuiderSpec(
        "blurry",
        "guide away from a blurrier self",
        "",
        (registry.Option("k", int, 1, "unused"),),
        frozenset(),
        frozenset(),
        2,
        build,
        linear=True,
    )
    monkeypatch.setitem(registry.GUIDERS, "blurry", spec)
    assert "blurry" in registry.names() and registry.parse_options("blurry", ["k=3"]) == {"k": 3}
    net = _net("plain")
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    den = registry.build("blurry", registry.Context(net, 1.0, options={}))
    torch.testing.assert_close(den(x, s), net(x, s))  # w = 1: no guidance
    # and rules accept it as a base once it is listed there: bases are the registry's linear guiders
    assert all(registry.get(b).linear for b in registry.get("apg").options[0].choices)
