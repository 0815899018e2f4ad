import json

import pytest
from click.testing import CliRunner

from guidelab.app import cli, sweep
from guidelab.errors import GuidelabError


def test_pareto_front_and_best_on_hand_made_rows():
    rows = [
        {"method": "a", "precision": 0.9, "recall": 0.1, "fd": 3.0},
        {"method": "a", "precision": 0.5, "recall": 0.5, "fd": 1.0},
        {"method": "b", "precision": 0.4, "recall": 0.4, "fd": 2.0},  # dominated by row 1
        {"method": "b", "precision": 0.2, "recall": 0.9, "fd": 0.5},
        {"method": "b", "precision": 0.2, "recall": 0.8, "fd": 0.4},
    ]  # dominated by row 3
    assert sweep.pareto_front(rows, "precision", "recall") == [0, 1, 3]
    # fd: lower is better, so the front on (fd, recall) keeps row 4 (lowest fd) and row 3 (best recall)
    assert sweep.pareto_front(rows, "fd", "recall") == [3, 4]
    best = sweep.best_per_method(rows, "fd")
    assert best["a"] is rows[1] and best["b"] is rows[4]
    assert sweep.best_per_method(rows, "precision")["a"] is rows[0]


def test_exact_world_sweep_writes_table(tmp_path):
    r = CliRunner().invoke(
        cli.main,
        [
            "sweep",
            "--out",
            str(tmp_path),
            "--methods",
            "none,cfg",
            "--weights",
            "1,3",
            "--intervals",
            "0.3-5",
            "--samples",
            "48",
            "--sampler",
            "euler",
            "--steps",
            "6",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    cells = [row["cell"] for row in res["rows"]]
    assert cells == ["none_w1", "cfg_w1_i0.3-5", "cfg_w3_i0.3-5"]  # none: one cell
    rows = {row["cell"]: row for row in res["rows"]}
    # cfg at w = 1 is bit-identical to no guidance: same metrics
    for k in ("fd", "precision", "recall", "mean_logp"):
        assert rows["none_w1"][k] == rows["cfg_w1_i0.3-5"][k]
    assert rows["cfg_w3_i0.3-5"]["fd"] != rows["none_w1"]["fd"]
    assert set(res["best"]) == {"none", "cfg"} and set(res["pareto"]) <= set(cells)
    assert rows["none_w1"]["extractor"] == "raw" and rows["none_w1"]["n"] == 48 and rows["none_w1"]["seeds"] == "0-47"
    csv_rows = sweep.read_rows(tmp_path)
    assert [c["cell"] for c in csv_rows] == cells and float(csv_rows[2]["w"]) == 3.0


def test_bad_metric():
    with pytest.raises(GuidelabError, match="unknown metric"):
        sweep.run("unused", None, sweep.SweepConfig({"none": [1]}, metric="beauty"))


def test_model_sweep_with_autoguidance_and_reference_file(tmp_path):
    import numpy as np
    import torch

    from guidelab import toy
    from guidelab.models.mlp import ToyMLP
    from guidelab.training import save_model

    torch.manual_seed(0)
    for name in ("main", "guide"):
        net = ToyMLP(hidden=8, depth=2)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        save_model(tmp_path / f"{name}.safetensors", net)
    np.savez(tmp_path / "ref.npz", samples=toy.tree("A").sample(64, 0.0, torch.Generator().manual_seed(1)).numpy())
    r = CliRunner().invoke(
        cli.main,
        [
            "sweep",
            "--out",
            str(tmp_path / "sw"),
            "--model",
            str(tmp_path / "main.safetensors"),
            "--guide",
            str(tmp_path / "guide.safetensors"),
            "--methods",
            "autoguidance",
            "--weights",
            "1,2",
            "--samples",
            "32",
            "--sampler",
            "euler",
            "--steps",
            "4",
            "--reference",
            str(tmp_path / "ref.npz"),
            "--metric",
            "precision",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert [row["cell"] for row in res["rows"]] == ["autoguidance_w1", "autoguidance_w2"]
    assert "mean_logp" not in res["rows"][0] and res["reference"] == {"n": 64, "seed": None}
    assert res["rows"][0]["fd"] != res["rows"][1]["fd"]


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "guidelab",
            "sample",
            "--out",
            str(tmp_path / "x"),
            "--model",
            str(tmp_path / "missing.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "checkpoint not found" in r.stderr
    assert not (tmp_path / "x").exists()  # nothing written for a refused job
