import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_guide_toy_example_runs_and_guidance_changes_quality(tmp_path):
    res = _load("guide_toy").main(["--iters", "32", "--samples", "256", "--out", str(tmp_path)])
    assert sorted(res) == [1.0, 2.0] and all(math.isfinite(v) for v in res.values())
    assert res[1.0] != res[2.0]


def test_train_autoguide_digits_quick(tmp_path):
    """--quick: tiny models trained for a few steps (seconds); autoguidance changes the samples."""
    res = _load("train_autoguide_digits").main(["--quick", "--weights", "1,2", "--out", str(tmp_path)])
    assert sorted(res) == [1.0, 2.0]
    assert all(0.0 <= r["class_accuracy"] <= 1.0 and r["fd"] > 0 and math.isfinite(r["fd"]) for r in res.values())
    x1, x2 = res[1.0]["samples"], res[2.0]["samples"]
    assert x1.shape == (100, 1, 8, 8) and x1.isfinite().all() and x2.isfinite().all()
    assert not (x1 == x2).all()  # w = 2 guides: different samples from the same noise
    # a second run reuses the trained models (run folders named by their config) and reproduces the samples
    again = _load("train_autoguide_digits").main(["--quick", "--weights", "2", "--out", str(tmp_path)])
    assert (again[2.0]["samples"] == x2).all()


@pytest.mark.slow
def test_guide_diffusers_example_cfg_and_pag_change_the_samples(tmp_path):
    pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
    res = _load("guide_diffusers").main(["--quick", "--out", str(tmp_path)])
    assert list(res) == ["none", "cfg", "pag", "pag+cfg"]
    assert all(r["samples"].isfinite().all() for r in res.values())
    assert res["none"]["change"] == 0 and all(res[k]["change"] > 0 for k in ("cfg", "pag", "pag+cfg"))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["cfg.png", "none.png", "pag+cfg.png", "pag.png"]


@pytest.mark.slow
def test_train_autoguide_digits_full_autoguidance_lowers_fd(tmp_path):
    """The full settings (minutes): autoguidance at w = 1.5 gives a lower digits FD than no guidance."""
    res = _load("train_autoguide_digits").main(["--weights", "1,1.5", "--out", str(tmp_path)])
    assert res[1.5]["fd"] < res[1.0]["fd"]
