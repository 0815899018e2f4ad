import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from guidelab import samplers, schedules, toy
from guidelab.app import jobs
from guidelab.errors import GuidelabError
from guidelab.rng import SampleNoise

CFG = jobs.SampleConfig(world="A", sampler="euler", steps=4)


def test_shards_hold_seeded_samples_equal_to_a_direct_run(tmp_path):
    paths = jobs.sample(tmp_path, CFG, n=10, seed_start=5, shard_size=4)
    assert [p.name for p in paths] == [
        "shard-000000005-000000008.npz",
        "shard-000000009-000000012.npz",
        "shard-000000013-000000014.npz",
    ]
    x, seeds = jobs.load_samples(tmp_path)
    assert seeds.tolist() == list(range(5, 15))
    # the same seeds sampled directly in one batch of 10: identical (per-sample generators)
    sig = schedules.karras(4, 0.002, 5.0, 7.0, dtype=torch.float32)
    noise = SampleNoise(range(5, 15))
    ref = samplers.euler(toy.tree("A"), noise.randn([2]) * sig[0], sig)
    assert np.array_equal(x, ref.numpy())
    assert json.loads((tmp_path / "job.json").read_text())["n"] == 10


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_resume_keeps_finished_shards_and_refuses_another_job(tmp_path):
    paths = jobs.sample(tmp_path, CFG, n=8, shard_size=4)
    first = paths[0].read_bytes()
    paths[1].unlink()  # as if killed before the 2nd shard
    (tmp_path / f".{paths[1].name}.tmp{_dead_pid()}.x1").write_bytes(b"partial")  # a killed writer's leftover
    mtime = paths[0].stat().st_mtime_ns
    jobs.sample(tmp_path, CFG, n=8, shard_size=4)
    assert paths[0].stat().st_mtime_ns == mtime and paths[0].read_bytes() == first  # not recomputed
    assert paths[1].exists() and not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(GuidelabError, match="another job"):
        jobs.sample(tmp_path, jobs.SampleConfig(world="A", sampler="euler", steps=5), n=8, shard_size=4)


def test_bad_configs():
    for cfg, msg in [
        (jobs.SampleConfig(world="A", model="m.safetensors"), "exactly one"),
        (jobs.SampleConfig(guider="magic"), "unknown guider"),
        (jobs.SampleConfig(sampler="nope"), "unknown sampler"),
        (jobs.SampleConfig(world=None, model="missing.safetensors"), "checkpoint not found"),
    ]:
        with pytest.raises(GuidelabError, match=msg):
            jobs.build(cfg)


def test_exact_world_cfg_w1_is_unguided_and_w3_moves_away_from_class_b(tmp_path):
    run = lambda name, **kw: jobs.load_samples(
        jobs.sample(  # noqa: E731
            tmp_path / name, jobs.SampleConfig(world="A", sampler="euler", steps=8, **kw), n=64
        )[0].parent
    )[0]
    plain, w1, w3 = run("plain"), run("w1", guider="cfg", w=1.0), run("w3", guider="cfg", w=3.0)
    assert np.array_equal(plain, w1)  # D_ref.lerp(D, 1) is D bit for bit
    # CFG against uncond = tree("AB") sharpens p_A / p_AB: samples leave the region class B shares
    B = toy.tree("B")
    lpB = lambda x: B.logp(torch.from_numpy(x), 0.0).mean().item()  # noqa: E731
    assert lpB(w3) < lpB(plain)


def _torchrun(args, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "guidelab",
        "sample",
        *args,
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and its workers
        raise
    assert p.returncode == 0, err[-2000:]


def test_world_sizes_1_and_2_give_bit_identical_union(tmp_path):
    args = ["--samples", "12", "--shard-size", "3", "--sampler", "euler_ancestral", "--steps", "4", "--quiet"]
    _torchrun(args + ["--out", str(tmp_path / "one")], 1)
    _torchrun(args + ["--out", str(tmp_path / "two")], 2)
    x1, s1 = jobs.load_samples(tmp_path / "one")
    x2, s2 = jobs.load_samples(tmp_path / "two")
    assert s1.tolist() == list(range(12)) and np.array_equal(s1, s2)
    assert np.array_equal(x1, x2) and x1.shape == (12, 2)
    names = lambda d: sorted(p.name for p in Path(d).iterdir())  # noqa: E731
    assert names(tmp_path / "one") == names(tmp_path / "two")


def test_model_checkpoints_with_cfg_and_autoguidance(tmp_path):
    from guidelab import guidance
    from guidelab.models.mlp import ToyMLP
    from guidelab.training import load_model, save_model

    torch.manual_seed(0)
    for name in ("main", "guide"):
        net = ToyMLP(hidden=8, depth=2, num_classes=2)
        with torch.no_grad():  # a fresh net may have a zero output layer: perturb all
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        save_model(tmp_path / f"{name}.safetensors", net)
    # chunk=0: the network sees the shard as one batch, like the direct computation below
    base = dict(world=None, model=str(tmp_path / "main.safetensors"), label=0, sampler="euler", steps=4, chunk=0)
    run = lambda name, **kw: jobs.load_samples(  # noqa: E731
        jobs.sample(tmp_path / name, jobs.SampleConfig(**base, **kw), n=6, shard_size=4)[0].parent
    )[0]
    plain = run("plain")
    assert np.array_equal(run("cfg1", guider="cfg", w=1.0), plain)  # w = 1: no guidance, bit for bit
    assert np.array_equal(run("ag1", guider="autoguidance", w=1.0, guide=str(tmp_path / "guide.safetensors")), plain)
    ag = run("ag2", guider="autoguidance", w=2.0, guide=str(tmp_path / "guide.safetensors"))
    # the same samples computed directly: seeds 0..5 in one batch
    main, guide = load_model(tmp_path / "main.safetensors"), load_model(tmp_path / "guide.safetensors")
    sig = schedules.karras(4, 0.002, 5.0, 7.0, dtype=torch.float32)
    x = SampleNoise(range(6)).randn([2]) * sig[0]
    ref = samplers.euler(guidance.autoguidance(main, guide, 2.0), x, sig, cond={"label": torch.zeros(6, dtype=torch.long)})
    assert np.array_equal(ag, ref.numpy()) and not np.array_equal(ag, plain)


def test_feature_stats_all_reduce_over_two_gloo_ranks(tmp_path):
    # each rank adds its own rows; after all_reduce every rank holds the stats of all rows
    script = tmp_path / "reduce.py"
    script.write_text(
        "import os, sys, numpy as np, torch, torch.distributed as dist\n"
        "from guidelab.metrics import FeatureStats\n"
        "dist.init_process_group('gloo'); r = dist.get_rank()\n"
        "x = np.random.default_rng(0).standard_normal((10, 3))\n"
        "s = FeatureStats(3).update(x[r::2]).all_reduce()\n"
        "one = FeatureStats(3).update(x)\n"
        "ok = s.count == 10 and torch.allclose(s.mean, one.mean) and torch.allclose(s.cov, one.cov)\n"
        "dist.destroy_process_group(); sys.exit(0 if ok else 1)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert p.returncode == 0, err[-2000:]


def test_sigkill_mid_job_then_resume_equals_uninterrupted_run(tmp_path):
    import time

    args = ["--samples", "40", "--shard-size", "2", "--sampler", "heun", "--steps", "64", "--quiet"]
    cmd = [sys.executable, "-m", "guidelab", "sample", "--out", str(tmp_path / "killed"), *args]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while len(list((tmp_path / "killed").glob("shard-*.npz"))) < 2 and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.kill()
    p.wait()
    done = sorted((tmp_path / "killed").glob("shard-*.npz"))
    for f in done:  # every visible shard is complete
        assert np.load(f)["samples"].shape == (2, 2)
    jobs.sample(tmp_path / "killed", jobs.SampleConfig(world="A", sampler="heun", steps=64), n=40, shard_size=2)
    jobs.sample(tmp_path / "clean", jobs.SampleConfig(world="A", sampler="heun", steps=64), n=40, shard_size=2)
    a, b = jobs.load_samples(tmp_path / "killed"), jobs.load_samples(tmp_path / "clean")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not list((tmp_path / "killed").glob(".*tmp*"))
