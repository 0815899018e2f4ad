import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from guidelab.app import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    r = CliRunner().invoke(
        cli.main,
        [
            "sweep",
            "--out",
            str(d),
            "--methods",
            "none,cfg",
            "--weights",
            "1,2",
            "--samples",
            "32",
            "--sampler",
            "euler",
            "--steps",
            "4",
        ],
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli.main, ["report", str(d)])
    assert r.exit_code == 0, r.output
    return d / "report.html"


def test_report_is_self_contained(report_path):
    text = report_path.read_text()
    srcs = re.findall(r'src="([^"]*)"|src=\'([^\']*)\'', text)
    srcs = [a or b for a, b in srcs]
    assert len(srcs) == 2 + 3  # 2 trade-off plots + one grid per cell
    assert all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing to fetch
    for cell in ("none_w1", "cfg_w1", "cfg_w2"):
        assert cell in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report_path, tmp_path):
    base = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    url = report_path.resolve().as_uri()
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert m and m.group(1) == m.group(2) == "5", dom[:300]
    shot = tmp_path / "shot.png"
    subprocess.run(base + ["--window-size=1000,1400", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    import matplotlib.image

    px = matplotlib.image.imread(shot)
    assert px.shape[0] > 100 and np.std(px[..., :3]) > 0.05  # not a blank page


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


def test_image_sweep_report_shows_class_grids(image_report, tmp_path):
    import base64
    import io

    from PIL import Image

    text = image_report.read_text()
    grids = re.findall(r"<figure><img alt='([^']*)' src='data:image/png;base64,([^']*)'>", text)
    assert [c for c, _ in grids] == ["none_w1", "cfg_w2"]
    for _, b64 in grids:
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert im.size == (10 * (8 * 3 + 2), 10 * (8 * 3 + 2))  # 10 classes x 10 samples, 3x cells
    assert "class_accuracy" in text and "digits-classifier" in text
    if CHROMIUM is not None:
        dom = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                image_report.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
        assert m and m.group(1) == m.group(2) == "4", dom[:300]
