"""Meng et al.'s stochastic sampler on a progressively distilled student through the sampling jobs
(`guidelab sample / evaluate --guider distilled --sampler meng_stochastic`): it runs on the student's own
N-step grid (not the karras grid of --steps), costs N network rows per sample, equals the sampler called by
hand on that grid, and is batch-invariant with per-sample seeds. A tiny random student, no training."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from guidelab import samplers
from guidelab.app import cli, jobs
from guidelab.errors import GuidelabError
from guidelab.models.image import PixelMLP
from guidelab.rng import SampleNoise
from guidelab.training import save_model
from guidelab.training.phema import load_network
from guidelab.training.student import distilled_denoiser

GRID = [80.0, 5.0, 1.0, 0.1, 0.0]  # a 4-step "progressive student" grid
N = len(GRID) - 1


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    torch.manual_seed(0)
    net = PixelMLP(hidden=16, depth=1, emb=8, num_classes=10, extra_scalar="w")
    with torch.no_grad():  # a fresh net may have a zero output layer: perturb all
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    meta = {"distilled": {"key": "w", "w_min": 1.0, "w_max": 3.0, "sampler": "euler", "sigmas": GRID}}
    return str(save_model(tmp_path_factory.mktemp("student") / "student.safetensors", net, meta=meta))


def _cfg(student, **kw):
    kw = {"guider": "distilled", "w": 2.0, "label": "balanced", "sampler": "meng_stochastic", "steps": 32, **kw}
    return jobs.SampleConfig(world=None, model=student, **kw)


def test_runs_on_the_students_grid_with_n_nfe_and_equals_the_sampler_by_hand(student):
    job = jobs.build(_cfg(student, chunk=0))  # chunk 0: the network sees exactly this batch, as the call by hand
    assert job.sampler == "meng_stochastic" and torch.equal(job.sigmas, torch.tensor(GRID))  # not karras(32)
    assert job.describe()["schedule"] == f"checkpoint grid ({N} steps)"
    seeds = [3, 4, 5, 17]
    got = job.generate(seeds)
    assert job.counts == {"model": N * len(seeds)}  # NFE = N

    net = load_network(student)
    noise = SampleNoise(seeds)
    x = noise.randn((1, 8, 8), torch.float32) * GRID[0]
    den = distilled_denoiser(net, 2.0)
    ref = samplers.meng_stochastic(den, x, torch.tensor(GRID), cond={"label": torch.tensor(seeds) % 10}, noise=noise)
    assert np.array_equal(got, ref.numpy())
    # not the deterministic student sampler, and not the same sampler on karras(32)
    noise = SampleNoise(seeds)
    x = noise.randn((1, 8, 8), torch.float32) * GRID[0]
    euler = samplers.euler(den, x, torch.tensor(GRID), cond={"label": torch.tensor(seeds) % 10})
    assert np.abs(got - euler.numpy()).max() > 1e-3
    assert jobs.build(_cfg(student, sampler=None)).sampler == "euler"  # without --sampler: the checkpoint's


def test_batch_invariant_with_per_sample_seeds(student, tmp_path):
    cfg = _cfg(student)
    one = jobs.load_shards(jobs.sample(tmp_path / "one", cfg, n=7, shard_size=1)[0].parent)
    three = jobs.load_shards(jobs.sample(tmp_path / "three", cfg, n=7, shard_size=3)[0].parent)
    assert np.array_equal(one["samples"], three["samples"])
    assert one["rows"] == three["rows"] == {"model": 7 * N}
    moved = jobs.load_shards(jobs.sample(tmp_path / "moved", cfg, n=3, seed_start=4, shard_size=2)[0].parent)
    assert np.array_equal(moved["samples"], one["samples"][4:7])  # a sample depends only on its seed
    # the stochastic steps draw per-sample noise: other seeds with the same labels give other samples
    later = jobs.load_shards(jobs.sample(tmp_path / "later", cfg, n=7, seed_start=1000, shard_size=7)[0].parent)
    assert later["labels"].tolist() == one["labels"].tolist()
    assert np.abs(later["samples"] - one["samples"]).max() > 1e-3


def test_cli_sample_uses_meng_on_the_students_grid(student, tmp_path):
    args = ["sample", "--model", student, "--guider", "distilled", "--weight", "2", "--label", "balanced"]
    args += ["--sampler", "meng_stochastic"]
    r = CliRunner().invoke(cli.main, [*args, "--samples", "5", "--shard-size", "2", "--quiet", "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    cli_x, _ = jobs.load_samples(tmp_path / "cli")
    api = jobs.load_shards(jobs.sample(tmp_path / "api", _cfg(student), n=5, shard_size=5)[0].parent)
    assert np.array_equal(cli_x, api["samples"]) and api["rows"] == {"model": 5 * N}


def test_schedule_options_that_a_student_ignores_are_refused(student):
    assert torch.equal(jobs.build(_cfg(student, steps=N)).sigmas, torch.tensor(GRID))  # its own step count is fine
    for kw, flag in ((dict(steps=8), "--steps"), (dict(sigma_max=10.0), "--sigma-max"), (dict(rho=3.0), "--rho")):
        with pytest.raises(GuidelabError, match=f"{flag} does not apply"):
            jobs.build(_cfg(student, **kw))
