"""Reliability promises of sampling jobs (docs/RELIABILITY.md): concurrent writers on one folder, resumes
that verify their inputs and shards, temp files of dead writers only, the HTML report escaped."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from guidelab._io import atomic_write, stale_temps
from guidelab.app import jobs
from guidelab.errors import GuidelabError
from guidelab.models.image import PixelMLP
from guidelab.training import save_model

CFG = dict(world="A", sampler="euler", steps=4)


def _job(out, w, q):
    torch.set_num_threads(1)
    try:
        jobs.sample(out, jobs.SampleConfig(guider="cfg", w=w, **CFG), n=24, shard_size=3)
        q.put("ok")
    except GuidelabError as e:
        q.put(f"refused: {e}")
    except BaseException as e:  # a traceback: the test fails on it
        q.put(f"crash: {e!r}")


def _race(out, weights):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_job, args=(out, w, q)) for w in weights]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
    return [q.get(timeout=5) for _ in ps]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = {}
    for w in (2.0, 3.0):
        d = tmp_path_factory.mktemp(f"single{w}")
        jobs.sample(d, jobs.SampleConfig(guider="cfg", w=w, **CFG), n=24, shard_size=3)
        out[w] = jobs.load_samples(d)
    return out


#: 2 trials in the default suite, 10 with -m slow (issue 14: 10 trials each).
TRIALS = [t if t < 2 else pytest.param(t, marks=pytest.mark.slow) for t in range(10)]


@pytest.mark.parametrize("trial", TRIALS)
def test_two_writers_same_settings_share_the_job(tmp_path, single, trial):
    res = _race(tmp_path, [2.0, 2.0])
    assert res == ["ok", "ok"]
    x, s = jobs.load_samples(tmp_path)
    assert np.array_equal(s, single[2.0][1]) and np.array_equal(x, single[2.0][0])
    assert not list(tmp_path.glob(".*.tmp*"))


@pytest.mark.parametrize("trial", TRIALS)
def test_two_writers_other_settings_one_refused_never_mixed(tmp_path, single, trial):
    res = sorted(_race(tmp_path, [2.0, 3.0]))
    assert res[0] == "ok" and res[1].startswith("refused") and "another job" in res[1], res
    w = json.loads((tmp_path / "job.json").read_text())["config"]["w"]
    x, s = jobs.load_samples(tmp_path)
    assert np.array_equal(s, single[w][1]) and np.array_equal(x, single[w][0])  # every shard of the owning job
    assert not list(tmp_path.glob(".*.tmp*"))


def _cli_sample(out, w):
    args = ["sample", "--out", str(out), "--world", "A", "--sampler", "euler", "--steps", "4", "--samples", "24"]
    args += ["--shard-size", "3", "--guider", "cfg", "--weight", str(w), "--quiet", "--threads", "1"]
    return subprocess.Popen(
        [sys.executable, "-c", "from guidelab.app.cli import run; run()", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("weights", [(2.0, 2.0), (2.0, 3.0)], ids=["same", "other"])
@pytest.mark.parametrize("trial", range(10))
def test_two_cli_writers_on_one_out(tmp_path, single, weights, trial):
    """The same race through `guidelab sample` itself: exit 0 or one `error:` line (exit 2), never a traceback,
    never a mixed folder, the folder identical to a single run of the job that owns it."""
    ps = [_cli_sample(tmp_path, w) for w in weights]
    res = [(p.wait(timeout=300), p.stderr.read()) for p in ps]
    for rc, err in res:
        assert "Traceback" not in err and rc in (0, 2), err
        assert rc == 0 or ("error:" in err and "another job" in err), err
    assert sorted(rc for rc, _ in res) == ([0, 0] if weights[0] == weights[1] else [0, 2]), res
    w = json.loads((tmp_path / "job.json").read_text())["config"]["w"]
    x, s = jobs.load_samples(tmp_path)
    assert np.array_equal(s, single[w][1]) and np.array_equal(x, single[w][0])
    assert not list(tmp_path.glob(".*.tmp*"))


def test_truncated_shard_is_redone_on_resume(tmp_path, single):
    cfg = jobs.SampleConfig(guider="cfg", w=2.0, **CFG)
    paths = jobs.sample(tmp_path, cfg, n=24, shard_size=3)
    paths[2].write_bytes(paths[2].read_bytes()[:100])  # a disk that lost the tail
    paths[4].write_bytes(b"")
    jobs.sample(tmp_path, cfg, n=24, shard_size=3)
    x, _ = jobs.load_samples(tmp_path)
    assert np.array_equal(x, single[2.0][0])


def test_shard_with_wrong_seeds_is_redone(tmp_path, single):
    cfg = jobs.SampleConfig(guider="cfg", w=2.0, **CFG)
    paths = jobs.sample(tmp_path, cfg, n=24, shard_size=3)
    paths[1].write_bytes(paths[0].read_bytes())  # shard 1 holds shard 0's seeds
    jobs.sample(tmp_path, cfg, n=24, shard_size=3)
    assert np.array_equal(jobs.load_samples(tmp_path)[0], single[2.0][0])


def _net(path, seed):
    torch.manual_seed(seed)
    net = PixelMLP(hidden=8, depth=1, emb=4, num_classes=0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    save_model(path, net)


def test_swapped_checkpoint_is_refused_on_resume(tmp_path):
    ck = tmp_path / "m.safetensors"
    _net(ck, 0)
    cfg = jobs.SampleConfig(world=None, model=str(ck), steps=2, chunk=0)
    out = tmp_path / "job"
    jobs.sample(out, cfg, n=4, shard_size=2)
    (out / jobs.shard_name(2, 4)).unlink()  # interrupted
    _net(ck, 1)  # replaced at the same path
    with pytest.raises(GuidelabError, match="model file changed"):
        jobs.sample(out, cfg, n=4, shard_size=2)
    assert not (out / jobs.shard_name(2, 4)).exists()


def test_refused_job_leaves_no_trace_and_the_corrected_one_runs(tmp_path):
    out = tmp_path / "job"
    with pytest.raises(GuidelabError):
        jobs.sample(out, jobs.SampleConfig(guider="cfg", w=2.0, sigma_max=float("inf"), **CFG), n=4)
    assert not out.exists()
    jobs.sample(out, jobs.SampleConfig(guider="cfg", w=2.0, **CFG), n=4)
    assert len(list(out.glob("shard-*.npz"))) == 1


def test_nan_checkpoint_refused_at_load(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from guidelab.training import load_model

    ck = tmp_path / "m.safetensors"
    _net(ck, 0)
    with safe_open(str(ck), "pt") as f:
        meta = f.metadata()
    t = load_file(ck)
    k = sorted(t)[0]
    t[k][0] = float("nan")
    save_file(t, ck, metadata=meta)
    with pytest.raises(GuidelabError, match="non-finite"):
        load_model(ck)


def test_stale_temps_lists_dead_writers_only(tmp_path):
    p = subprocess.Popen(["true"])
    p.wait()
    dead = tmp_path / f".a.npz.tmp{p.pid}.xyz"
    live = tmp_path / f".a.npz.tmp{subprocess.os.getppid()}.xyz"
    for f in (dead, live):
        f.write_bytes(b"x")
    assert stale_temps(tmp_path, "a.npz") == [dead] and stale_temps(tmp_path, "b.npz") == []
    atomic_write(tmp_path / "a.npz", b"data")  # its own temp matches the pattern and is gone
    assert sorted(tmp_path.iterdir()) == sorted([dead, live, tmp_path / "a.npz"])


def test_report_escapes_every_field(tmp_path):
    from guidelab.app import report

    mark = "<script>alert(1)</script>"
    cell = "cfg_w2"
    jobs.sample(tmp_path / "samples" / cell, jobs.SampleConfig(guider="cfg", w=2.0, **CFG), n=16, shard_size=16)
    row = {
        "cell": cell,
        "method": "cfg",
        "w": 2.0,
        "interval": mark,
        "fd": 1.0,
        "precision": 0.5,
        "recall": 0.5,
        "n": mark,
        "note": mark,
    }
    res = {
        "rows": [row],
        "metric": "fd",
        "quality": "precision",
        "diversity": "recall",
        "best": {mark: mark},
        "pareto": [mark],
        "n": mark,
        "reference": {mark: mark},
    }
    (tmp_path / "results.json").write_text(json.dumps(res))
    html = report.render(tmp_path).read_text()
    assert mark not in html and "&lt;script&gt;" in html


def test_nan_network_stops_at_its_step_unless_allowed(tmp_path):
    class NaNAfter(torch.nn.Module):  # finite at sigma_max, NaN below sigma 1
        def forward(self, x, sigma, **cond):
            return torch.where(sigma.reshape(-1, 1) < 1, torch.nan, x * 0.5)

    cfg = jobs.SampleConfig(guider="none", **CFG)
    job = jobs.build(cfg)
    job.net = job.main.net = NaNAfter()
    with pytest.raises(GuidelabError, match=r"step \d+ \(sigma"):
        jobs.sample(tmp_path / "a", cfg, n=3, job=job)
    assert not (tmp_path / "a").exists()  # refused by the probe, before any write
    from guidelab import samplers

    with samplers.allow_nonfinite():  # what --allow-nonfinite does
        jobs.sample(tmp_path / "b", cfg, n=3, job=job)
    assert np.isnan(jobs.load_samples(tmp_path / "b")[0]).all()
