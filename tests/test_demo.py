import json

import pytest
from click.testing import CliRunner

from guidelab.app import demo
from guidelab.app.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(main, ["demo", "--quick", "--samples", "256", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output, result.stderr if result.stderr_bytes is not None else result.output


def test_demo_writes_metrics_and_report(quick_run):
    out, output, _ = quick_run
    records = json.loads((out / "metrics.json").read_text())["records"]
    methods = {(r["method"], r["w"]) for r in records}
    assert ("none", 1.0) in methods
    assert {m for m, _ in methods} == {"none", "cfg", "autoguidance"}
    for r in records:
        for key in ("mean_logp", "precision", "recall"):
            assert isinstance(r[key], float)
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert r["nfe_per_sample"] == (63 if r["method"] == "none" else 126)  # 32 Heun steps, 1 or 2 networks
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<table>" in html
    for name in ("samples.png", "tradeoff.png", "all_samples.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in output
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_demo_reuses_cached_models(quick_run, monkeypatch):
    out, _, _ = quick_run
    calls = []
    import guidelab.training.loop as loop

    original = loop.Trainer.train_step
    monkeypatch.setattr(loop.Trainer, "train_step", lambda self: calls.append(1) or original(self))
    demo.train_models(out, progress=False, **demo.QUICK)
    assert not calls


def _rec(method, w, logp, prec, rec):
    return demo.Record(method, w, logp, prec, rec, 0.0, 0, 0.0)


def test_check_finding_reports_what_was_measured():
    holds = [_rec("none", 1, 0.0, 0.80, 0.95), _rec("autoguidance", 2, 0.5, 0.9, 0.93), _rec("cfg", 2, 0.45, 0.9, 0.6)]
    assert [ok for _, ok, _ in demo.check_finding(holds)] == [True, True, True]
    fails = [_rec("none", 1, 0.0, 0.80, 0.95), _rec("autoguidance", 2, 0.5, 0.9, 0.6), _rec("cfg", 2, 0.45, 0.9, 0.58)]
    assert [ok for _, ok, _ in demo.check_finding(fails)] == [True, False, False]


def test_cli_lists_samplers_and_rejects_bad_options(tmp_path):
    runner = CliRunner()
    assert "heun" in runner.invoke(main, ["samplers"]).output
    bad = runner.invoke(main, ["demo", "--samples", "3", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "samples" in bad.output


def test_demo_reports_progress_over_samples(quick_run):
    _, _, err = quick_run
    assert "using 1 CPU thread" in err  # small models: one thread, and the choice is logged
    assert "training (or reusing) the main model" in err
    assert f"{256 * 9}/{256 * 9} samples [" in err and "<" in err  # a bar over samples with an ETA


def test_demo_records_provenance_in_metrics_and_figures(quick_run):
    from guidelab._io import sha256
    from guidelab.app import provenance

    out, _, _ = quick_run
    prov = json.loads((out / "metrics.json").read_text())["provenance"]
    assert all(isinstance(v, str) for v in prov.values())
    for k in ("guidelab_version", "git_commit", "command", "torch", "device", "cpu", "sampler", "steps", "schedule", "seeds"):
        assert prov[k], k
    assert prov["command"].startswith("guidelab demo --quick") and prov["guider"] == "none,cfg,autoguidance"
    models = sorted(k for k in prov if k.startswith("model_") and not k.endswith("_sha256"))
    assert models == ["model_guide", "model_main", "model_uncond"]
    for k in models:
        assert prov[f"{k}_sha256"] == sha256(prov[k])
    for name in ("samples.png", "tradeoff.png", "all_samples.png"):
        assert provenance.read_png(out / name) == prov
    page = (out / "report.html").read_text()  # the CLI draws it with report.demo_page
    assert prov["git_commit"] in page and prov["model_main_sha256"] in page and "<table>" in page


def test_demo_parameter_count_behind_its_thread_default():
    from guidelab.models import registry
    from guidelab.threads import SMALL_MODEL, choose_threads
    from guidelab.training.toy import ToyConfig

    largest = max(
        sum(p.numel() for p in registry.build(ToyConfig(hidden=m["hidden"]).model()).parameters()) for m in demo.MODELS.values()
    )
    assert largest == demo.PARAMETERS <= SMALL_MODEL and choose_threads(parameters=demo.PARAMETERS)[0] == 1
