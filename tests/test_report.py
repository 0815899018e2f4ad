import html
import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from guidelab.app import cli, report
from guidelab.errors import GuidelabError

CELLS = ("none_w1", "cfg_w1", "cfg_w2", "cfg_w3", "apg_w1", "apg_w2", "apg_w3")
# Markup planted in every free-text field of a results.json: none of it may reach the page raw.
MARK = "<script>alert(1)</script>\"onerror=alert(2) 'x' &amp; & $a$"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    r = CliRunner().invoke(
        cli.main,
        [
            "sweep",
            "--out",
            str(d),
            "--methods",
            "none,cfg,apg",
            "--weights",
            "1,2,3",
            "--samples",
            "32",
            "--sampler",
            "euler",
            "--steps",
            "4",
            "--metric",
            "mean_logp",
            "--quality",
            "mean_logp",
        ],
    )
    assert r.exit_code == 0, r.output
    return d


@pytest.fixture(scope="module")
def report_path(sweep_dir):
    r = CliRunner().invoke(cli.main, ["report", str(sweep_dir)])
    assert r.exit_code == 0, r.output
    return sweep_dir / "report.html"


def _copy(sweep_dir, tmp_path, edit) -> Path:
    """A copy of the sweep whose results.json is ``edit(results)``."""
    d = tmp_path / "copy"
    shutil.copytree(sweep_dir, d)
    res = json.loads((d / "results.json").read_text())
    (d / "results.json").write_text(json.dumps(edit(res)))
    return d


def _table(text: str, table_id: str) -> list[list[str]]:
    pattern = rf"<table[^>]* id='{table_id}'>(.*?)</table>" if table_id else r"<table>(.*?)</table>"
    body = re.search(pattern, text, re.S).group(1)
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr) for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]


def test_report_is_self_contained(report_path):
    text = report_path.read_text()
    srcs = re.findall(r'src="([^"]*)"|src=\'([^\']*)\'', text)
    srcs = [a or b for a, b in srcs]
    # 2 trade-off plots + one grid per cell + the matched-quality row (no guidance, cfg, apg)
    assert len(srcs) == 2 + len(CELLS) + 3
    assert all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing to fetch
    for cell in CELLS:
        assert cell in text


def test_one_number_format_per_metric(report_path, sweep_dir):
    text = report_path.read_text()
    res = json.loads((sweep_dir / "results.json").read_text())
    head, *rows = _table(text, "results")
    assert len(rows) == len(CELLS)
    for r, tds in zip(res["rows"], rows):
        got = dict(zip(head, tds))
        assert re.fullmatch(r"-?\d+\.\d{3}", got["mean_logp"]) and re.fullmatch(r"\d\.\d{3}", got["recall"])
        assert re.fullmatch(r"\d+\.\d{4}", got["sliced_wasserstein"]) and re.fullmatch(r"\d+\.\d{5}", got["kid"])
        assert got["mean_logp"] == f"{r['mean_logp']:.3f}" and got["w"] == f"{r['w']:g}"
        # the caption under the cell's grid shows the same text as the table
        assert f"{r['cell']}<br>mean_logp {got['mean_logp']}, recall {got['recall']}</figcaption>" in text


def test_legend_explains_the_highlighted_rows(report_path, sweep_dir):
    text = report_path.read_text()
    res = json.loads((sweep_dir / "results.json").read_text())
    highlighted = re.findall(r'<tr class="best"><td>(?:&#9670; )?([^<]*)</td>', text)
    assert sorted(highlighted) == sorted(res["best"].values()) and len(highlighted) == 3
    legend = re.search(r"<div class='legend'>(.*?)</div>", text, re.S).group(1)
    assert "swatch" in legend and "best weight of its method by <b>mean_logp</b> (higher is better)" in legend
    assert "Pareto front" in legend
    front = re.findall(r"<td>&#9670; ([^<]*)</td>", text)
    assert sorted(front) == sorted(res["pareto"])


def test_matched_quality_picks_each_methods_closest_cell():
    rows = [
        {"cell": "none_w1", "method": "none", "w": 1.0, "q": 0.1},
        {"cell": "a_w1", "method": "a", "w": 1.0, "q": 0.1},
        {"cell": "a_w2", "method": "a", "w": 2.0, "q": 0.5},
        {"cell": "a_w3", "method": "a", "w": 3.0, "q": 0.9},
        {"cell": "b_w2", "method": "b", "w": 2.0, "q": 0.3},
        {"cell": "b_w3", "method": "b", "w": 3.0, "q": 0.6},
    ]
    report.HIGHER_IS_BETTER.setdefault("q", True)
    try:
        target, picks = report.matched_quality(rows, "q")
        assert target == 0.6 and [r["cell"] for r in picks] == ["a_w2", "b_w3"]  # b reaches 0.6 at best
        report.HIGHER_IS_BETTER["q"] = False  # lower is better: the target is the worst of the methods' lowest
        target, picks = report.matched_quality(rows, "q")
        assert target == 0.5 and [r["cell"] for r in picks] == ["a_w2", "b_w3"]
        assert report.matched_quality([r for r in rows if r["method"] != "b"], "q") is None
    finally:
        del report.HIGHER_IS_BETTER["q"]


def test_matched_quality_section_shows_the_picked_cells(report_path, sweep_dir):
    text = report_path.read_text()
    res = json.loads((sweep_dir / "results.json").read_text())
    target, picks = report.matched_quality(res["rows"], "mean_logp")
    shown = re.findall(r"<img alt='([^']*)'", re.search(r"<div class='row' id='matched'>(.*?)</div>", text, re.S).group(1))
    assert shown == ["none_w1"] + [r["cell"] for r in picks] and all(not c.endswith("_w1") for c in shown[1:])
    assert f"mean_logp &asymp; {target:.3f}" in text


def test_labels_do_not_overlap_where_fixed_offsets_would():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = [(0.5 + 0.004 * i, 1.0 + 0.002 * i) for i in range(8)] + [(0.2, 0.2), (0.9, 0.1)]
    texts = [f"w={1 + 0.5 * i:g}" for i in range(len(xy))]

    def boxes(anns, fig):  # the labels' text boxes (an annotation's own extent includes its leader line)
        fig.canvas.draw()
        rend = fig.canvas.get_renderer()
        return [matplotlib.text.Text.get_window_extent(a, rend) for a in anns]

    def n_overlaps(bbs):
        return sum(bbs[i].overlaps(bbs[j]) for i in range(len(bbs)) for j in range(i))

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(*zip(*xy), "o")
    naive = [ax.annotate(t, p, xytext=(3, 3), textcoords="offset points", fontsize=9) for t, p in zip(texts, xy)]
    assert n_overlaps(boxes(naive, fig)) > 5  # the crowded cluster: fixed offsets pile up
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(*zip(*xy), "o")
    anns = report.place_labels(ax, xy, texts)
    bbs = boxes(anns, fig)
    assert [a.get_text() for a in anns] == texts and n_overlaps(bbs) == 0
    assert all(a.get_fontsize() == report.LABEL_FONTSIZE >= 9 for a in anns)
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in bbs)
    plt.close(fig)


def test_fmt_one_format_per_field():
    assert report.fmt("precision", 0.5) == "0.500" and report.fmt("fd", 12.34567) == "12.346"
    assert report.fmt("w", 2.0) == "2" and report.fmt("w", "linear:1-4") == "linear:1-4"
    assert report.fmt("n", 32) == "32" and report.fmt("x", None) == "" and report.fmt("x", float("nan")) == "nan"
    assert report.fmt("something_else", 1 / 3) == "0.3333"


def test_provenance_block_renders_every_key_escaped(sweep_dir, tmp_path):
    prov = {
        "guidelab_version": "0.1.0",
        "git_commit": "abc123+dirty",
        "command": "guidelab sweep --out 'a b' --methods none,cfg",
        "model": "m.safetensors",
        "model_sha256": "f" * 64,
        "sampler": "euler",
        "steps": "4",
        "torch": "2.13.0",
        "device": "cpu",
    }
    d = _copy(sweep_dir, tmp_path, lambda res: {**res, "provenance": prov})
    text = report.render(d).read_text()
    got = dict(_table(text, "provenance"))
    assert got == {k: html.escape(v) for k, v in prov.items()}
    assert "not recorded" not in text


def test_provenance_not_recorded_for_an_old_results_json(sweep_dir, tmp_path):
    d = _copy(sweep_dir, tmp_path, lambda res: {k: v for k, v in res.items() if k != "provenance"})
    text = report.render(d).read_text()
    assert re.search(r"<p class='missing' id='provenance'>Provenance: <b>not recorded</b>", text)
    assert "<table class='provenance'" not in text


def test_report_shows_what_the_sweep_recorded(report_path, sweep_dir):
    prov = json.loads((sweep_dir / "results.json").read_text()).get("provenance")
    if prov is None:
        pytest.skip("this guidelab's sweep does not record provenance yet")
    assert dict(_table(report_path.read_text(), "provenance")) == {
        html.escape(k): html.escape(v if isinstance(v, str) else json.dumps(v)) for k, v in prov.items()
    }


def test_markup_in_every_field_is_escaped(sweep_dir, tmp_path):
    def plant(res):
        method = {"none": "none", "cfg": MARK + "cfg", "apg": MARK + "apg"}
        for r in res["rows"]:
            r["method"] = method[r["method"]]
            if r["method"] != "none":
                r["w"] = MARK + str(r["w"])  # weights may be schedule texts
            r["interval"] = MARK
            for k in ("extractor", "weights_sha256", "resize", "n", "seeds", "density"):
                r[k] = MARK
            r[MARK] = MARK  # an unknown column
        res["best"] = {MARK + k: v for k, v in res["best"].items()}
        res["pareto"] = res["pareto"] + [MARK]
        res["reference"] = {MARK: MARK, "n": MARK}
        res["provenance"] = {MARK: MARK, "command": MARK}
        return res

    d = _copy(sweep_dir, tmp_path, plant)
    text = report.render(d).read_text()
    assert "<script>alert" not in text and '"onerror' not in text and "'x'" not in text
    assert "&amp; &" not in text and "&amp;amp; &amp;" in text  # a planted "&" (even "&amp;") is escaped
    assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;") > 20
    assert len(re.findall(r"<script>", text)) == 1  # the page's own image-check script only


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda res: {**res, "metric": MARK}, "metric '<script>"),
        (lambda res: {**res, "quality": "nope"}, "quality 'nope' is not a metric"),
        (lambda res: {**res, "rows": [{**r, "cell": MARK} for r in res["rows"]]}, "is not a folder name"),
        (lambda res: {**res, "rows": [{**r, "mean_logp": MARK} for r in res["rows"]]}, "has no number for 'mean_logp'"),
        (lambda res: {**res, "rows": [{k: v for k, v in r.items() if k != "w"} for r in res["rows"]]}, "has no 'w'"),
        (lambda res: {**res, "best": [MARK]}, "best must map methods to cells"),
        (lambda res: {**res, "rows": []}, "has no rows of cells"),
        (lambda res: [res], "is not a sweep's results.json"),
    ],
)
def test_bad_results_json_is_refused_before_writing(sweep_dir, tmp_path, edit, message):
    d = _copy(sweep_dir, tmp_path, edit)
    (d / "report.html").unlink(missing_ok=True)
    with pytest.raises(GuidelabError, match=re.escape(message)):
        report.render(d)
    assert not (d / "report.html").exists()


@pytest.fixture(scope="module")
def image_report(tmp_path_factory):
    import torch

    from guidelab.models.digits import DigitsClassifier
    from guidelab.models.image import PixelMLP
    from guidelab.training import save_model

    d = tmp_path_factory.mktemp("image_sweep")
    torch.manual_seed(0)
    net = PixelMLP(hidden=16, depth=1, emb=8, num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    save_model(d / "m.safetensors", net)
    save_model(d / "clf.safetensors", DigitsClassifier(channels=4, features=8))
    r = CliRunner().invoke(
        cli.main,
        [
            "sweep",
            "--out",
            str(d / "sw"),
            "--model",
            str(d / "m.safetensors"),
            "--methods",
            "none,cfg",
            "--weights",
            "2",
            "--samples",
            "30",
            "--sampler",
            "euler",
            "--steps",
            "3",
            "--classifier",
            str(d / "clf.safetensors"),
        ],
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli.main, ["report", str(d / "sw")])
    assert r.exit_code == 0, r.output
    return d / "sw" / "report.html"


def test_image_sweep_report_shows_class_grids(image_report):
    import base64
    import io

    from PIL import Image

    text = image_report.read_text()
    samples = re.search(r"<div id='samples'>(.*?)</div></div>", text, re.S).group(1)
    grids = re.findall(r"<figure><img alt='([^']*)' src='data:image/png;base64,([^']*)'>", samples)
    assert [c for c, _ in grids] == ["none_w1", "cfg_w2"]
    for _, b64 in grids:
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert im.size == (10 * (8 * 3 + 2), 10 * (8 * 3 + 2))  # 10 classes x 10 samples, 3x cells
    assert "class_accuracy" in text and "digits-classifier" in text
    assert "Needs at least two guided methods" in text  # one guided method: no matched-quality row


# ---------------------------------------------------------------------------------------------
# The demo report.


@pytest.fixture
def coarse_outline(monkeypatch):
    """The demo's exact-density outlines on a 24x24 grid instead of 220x220 (seconds less; not under test)."""
    import functools

    from guidelab.app import demo

    exact = demo._outline_grid.__wrapped__
    coarse = functools.lru_cache(None)(lambda grid=220: exact(24))
    monkeypatch.setattr(demo, "_outline_grid", coarse)


def _demo_inputs():
    import torch

    from guidelab.app.demo import Record

    records = [Record("none", 1.0, -1.23456, 0.5, 0.91234, 0.012345, 32, 0.1)]
    records += [Record("cfg", w, -1.0 + 0.1 * w, 0.7, 0.8 - 0.1 * w, 0.02, 64, 0.2) for w in (1.5, 2.0, 3.0)]
    records += [Record("autoguidance", w, -0.9 + 0.1 * w, 0.75, 0.85 - 0.05 * w, 0.015, 64, 0.2) for w in (1.5, 2.0)]
    g = torch.Generator().manual_seed(0)
    samples = {(r.method, r.w): 0.3 + 0.2 * torch.randn(64, 2, generator=g) for r in records}
    exact = 0.3 + 0.2 * torch.randn(64, 2, generator=g)
    baseline = {"mean_logp": -0.5, "precision": 0.8, "recall": 0.8, "sliced_wasserstein": 0.001}
    findings = [(MARK + " claim", True, "evidence " + MARK)]
    nets = {k: torch.nn.Linear(2, 2) for k in ("main", "guide", "uncond")}
    return records, samples, exact, baseline, findings, nets


def _demo_page(*args, **kwargs):
    """report.demo_page with the demo's own figures, model table and grid (what demo.run passes)."""
    from guidelab.app import demo

    grid = (demo.STEPS, demo.SIGMA_MIN, demo.SIGMA_MAX, demo.RHO)
    return report.demo_page(*args, scatter=demo.scatter_figure, models=demo.MODELS, grid=grid, **kwargs)


def test_demo_page_formats_legend_provenance_and_escaping(coarse_outline):
    records, samples, exact, baseline, findings, nets = _demo_inputs()
    prov = {"command": "guidelab demo --quick " + MARK, "torch": "2.13.0"}
    page, figures = _demo_page(records, samples, exact, baseline, findings, nets, n=64, seconds=1.0, provenance=prov)
    assert sorted(figures) == ["all_samples.png", "samples.png", "tradeoff.png"]
    assert all(png.startswith(b"\x89PNG") for png in figures.values())
    head, *rows = _table(page, "")  # the demo's metrics table: the first plain <table>
    assert head[:3] == ["method", "w", "mean log p"] and len(rows) == len(records) + 1
    assert rows[0][:3] == ["none", "1", "-1.235"] and rows[-1][2:4] == ["-0.500", "0.800"]  # one format per metric
    best = re.findall(r"<tr class=best><td>([^<]*)</td><td>([^<]*)</td>", page)
    assert best == [("cfg", "3"), ("autoguidance", "2")]  # each method's best mean log p, explained by the legend
    assert "best weight of its method by <b>mean_logp</b>" in page
    assert "matched quality" in page and "CFG at w = 3" in page
    assert dict(_table(page, "provenance")) == {k: html.escape(v) for k, v in prov.items()}
    assert "<script>alert" not in page and len(re.findall(r"<script>", page)) == 1
    page, _ = _demo_page(records, samples, exact, baseline, findings, nets, n=64, seconds=1.0)
    assert "Provenance: <b>not recorded</b>" in page


@pytest.mark.slow
def test_demo_run_draws_its_report_with_demo_page(tmp_path):
    """demo.run's report.html is report.demo_page's: the provenance demo.run collects shown in the page."""
    from guidelab.app import demo

    demo.run(tmp_path, n=256, progress=False, model_overrides=demo.QUICK)
    text = (tmp_path / "report.html").read_text()
    prov = json.loads((tmp_path / "metrics.json").read_text())["provenance"]
    assert dict(_table(text, "provenance")) == {html.escape(k): html.escape(str(v)) for k, v in prov.items()}
    assert "best weight of its method by <b>mean_logp</b>" in text and "<table>" in text
