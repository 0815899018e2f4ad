"""The reports as a browser shows them: headless Chromium renders report.html from disk, dumps the DOM
after the page's load script measured its layout, and takes a screenshot. Skipped where no Chromium
exists (.ci/run installs Debian's chromium when it runs as root)."""

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from guidelab.app import cli, report
from test_report import _demo_inputs, _demo_page, coarse_outline  # noqa: F401  (coarse_outline: a fixture used below)

BROWSER = next((b for b in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if b), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no headless browser: none of chromium, chromium-browser, google-chrome is on PATH "
    "(apt-get install -y chromium; .ci/run does it when run as root)",
)

PROVENANCE = {
    "guidelab_version": "0.1.0",
    "git_commit": "0123abcd",
    "command": "guidelab sweep --out runs/sw --methods none,cfg,apg",
    "sampler": "euler",
    "steps": "4",
    "torch": "2.13.0",
    "device": "cpu",
}


def _browse(page, tmp_path, height=3000):
    """(DOM after load, the screenshot as float RGB [H, W, 3]) of ``page`` in headless Chromium."""
    shot = tmp_path / "shot.png"
    cmd = [
        BROWSER,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        f"--window-size=1200,{height}",
        f"--screenshot={shot}",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    import matplotlib.image

    return dom, matplotlib.image.imread(shot)[..., :3]


def _layout(dom):
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert m and m.group(1) == m.group(2), dom[:300]
    layout = json.loads(html.unescape(re.search(r'data-layout="([^"]*)"', dom).group(1)))
    return int(m.group(2)), layout


def _painted(px, rgb, tol=0.08) -> int:
    """Pixels of the screenshot within ``tol`` of colour ``rgb`` (0-255)."""
    return int((np.abs(px - np.asarray(rgb) / 255).max(-1) < tol).sum())


@pytest.fixture(scope="module")
def browsed(tmp_path_factory):
    """A sweep's report with provenance, rendered once: (DOM, screenshot, layout, image count)."""
    d = tmp_path_factory.mktemp("sweep")
    args = ["sweep", "--out", str(d), "--methods", "none,cfg,apg", "--weights", "2,3", "--samples", "32"]
    r = CliRunner().invoke(cli.main, args + ["--sampler", "euler", "--steps", "4", "--quality", "mean_logp"])
    assert r.exit_code == 0, r.output
    res = json.loads((d / "results.json").read_text())
    (d / "results.json").write_text(json.dumps({**res, "provenance": PROVENANCE}))
    dom, px = _browse(report.render(d), d)
    n, layout = _layout(dom)
    return dom, px, layout, n


def test_sweep_report_images_all_decoded_and_laid_out(browsed):
    _, _, layout, n = browsed
    assert n == 2 + 5 + 3  # trade-off plots, one grid per cell, the matched-quality row (none, cfg, apg)
    assert all(w > 100 and h > 100 for w, h in layout["images"])  # every image laid out, not collapsed


def test_sweep_report_shows_the_provenance_table(browsed):
    dom, _, layout, _ = browsed
    w, h = layout["provenance"]
    assert w > 300 and h > 20 * len(PROVENANCE) * 0.8  # the provenance table: one visible line per field
    for k, v in PROVENANCE.items():
        assert re.search(rf"<th scope=\"row\">{re.escape(k)}</th><td>{re.escape(html.escape(v, quote=False))}</td>", dom)


def test_sweep_report_screenshot_shows_plots_and_highlighted_rows(browsed):
    _, px, _, _ = browsed
    assert px.shape[0] > 1000 and np.std(px) > 0.05  # not a blank page
    assert _painted(px, (255, 127, 14)) > 300 and _painted(px, (44, 160, 44)) > 300  # the cfg / apg lines (C1, C2)
    assert _painted(px, (0xDF, 0xF5, 0xDF), tol=0.02) > 1000  # the highlighted best rows and their legend swatch


@pytest.mark.usefixtures("coarse_outline")
@pytest.mark.parametrize("provenance", [PROVENANCE, None], ids=["provenance", "old-file"])
def test_demo_report_in_a_browser(tmp_path, provenance):
    records, samples, exact, baseline, findings, nets = _demo_inputs()
    page, _ = _demo_page(records, samples, exact, baseline, findings, nets, n=64, seconds=1.0, provenance=provenance)
    (tmp_path / "demo.html").write_text(page)
    dom, px = _browse(tmp_path / "demo.html", tmp_path, height=2600)
    n, layout = _layout(dom)
    assert n == 3 and all(w > 300 and h > 150 for w, h in layout["images"])
    assert np.std(px) > 0.05 and _painted(px, (0xD6, 0x27, 0x28)) > 100  # CFG's red on screen (the trade-off plot)
    if provenance:
        assert layout["provenance"][1] > 20 * len(PROVENANCE) * 0.8
    else:  # an old metrics file: the block says so, visibly
        assert layout["provenance"][0] > 100 and layout["provenance"][1] > 5 and "<b>not recorded</b>" in dom
