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
