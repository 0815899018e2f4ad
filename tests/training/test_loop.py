import multiprocessing
import os
from dataclasses import asdict

import pytest
import torch

from guidelab.errors import GuidelabError
from guidelab.models import build
from guidelab.toy import tree
from guidelab.training import LoopConfig, ToyConfig, Trainer, load, load_model, snapshot_path, step_generator, train, train_toy
from guidelab.training.toy import toy_loss

TINY = dict(batch=128, hidden=16, depth=2, lr_ref_steps=8, snapshot_every=8)


class Killed(Exception):
    pass


def _run(run_dir, cfg, kill_at=None, checkpoint_every=5, prefetch=False):
    def on_step(step, loss):
        if step == kill_at:
            raise Killed

    return train(
        run_dir,
        cfg.model(),
        toy_loss(cfg),
        cfg.loop(),
        meta=asdict(cfg),
        checkpoint_every=checkpoint_every,
        progress=False,
        on_step=on_step,
        threads=1,
        prefetch=prefetch,
    )


def test_loss_decreases(tmp_path):
    cfg = ToyConfig(iters=100, **{**TINY, "batch": 256, "lr_ref_steps": 64})
    final = _run(tmp_path, cfg)
    loss = load(tmp_path / "state.safetensors")[0]["log/loss"]
    assert loss.shape == (100,) and loss[-20:].mean() < 0.85 * loss[:5].mean()
    # Held-out exact-score error of the final EMA model vs the untrained (Gaussian) model.
    world, g = tree("A"), torch.Generator().manual_seed(123)
    sigma = (torch.randn(2048, generator=g) * 1.5 - 2.3).exp()
    x = world.sample(2048, sigma, generator=g)
    err = lambda m: (sigma**2 * (m.score(x, sigma) - world.score(x, sigma)).square().mean(1)).mean().item()
    assert err(load_model(final)) < 0.8 * err(build(cfg.model()).eval())


@pytest.mark.parametrize("kill_at", [3, 10, 13, 24])
def test_kill_and_resume_is_bit_identical(tmp_path, kill_at):
    cfg = ToyConfig(iters=24, **TINY)
    final = _run(tmp_path / "full", cfg)
    with pytest.raises(Killed):
        _run(tmp_path / "resumed", cfg, kill_at=kill_at)  # state saved at 5, 10, 15, 20, 24
    final2 = _run(tmp_path / "resumed", cfg)
    a, ca = load(tmp_path / "full" / "state.safetensors")
    b, cb = load(tmp_path / "resumed" / "state.safetensors")
    assert ca == cb and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    for s in (8, 16, 24):
        p, q = snapshot_path(tmp_path / "full", s, 0.01), snapshot_path(tmp_path / "resumed", s, 0.01)
        assert p.read_bytes() == q.read_bytes()
    assert final.name == final2.name


# The batches computed ahead in a worker process (training/prefetch.py; more in test_prefetch.py).


def _same_state(a, b):
    (ta, ia), (tb, ib) = load(a / "state.safetensors"), load(b / "state.safetensors")
    return ia == ib and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("loss", ["score", "edm"])
def test_prefetched_run_is_bit_identical(tmp_path, loss):
    cfg = ToyConfig(iters=20, loss=loss, **TINY)
    _run(tmp_path / "plain", cfg, prefetch=False)
    _run(tmp_path / "prefetched", cfg, prefetch=True)
    assert _same_state(tmp_path / "plain", tmp_path / "prefetched")
    assert not multiprocessing.active_children()  # the worker is gone


def test_killed_prefetched_run_resumes_bit_identically(tmp_path):
    cfg = ToyConfig(iters=20, **TINY)
    _run(tmp_path / "plain", cfg, prefetch=False)
    with pytest.raises(Killed):
        _run(tmp_path / "resumed", cfg, prefetch=True, kill_at=12)  # state saved at 10: the worker restarts at 10
    assert not multiprocessing.active_children()
    _run(tmp_path / "resumed", cfg, prefetch=True)
    assert _same_state(tmp_path / "plain", tmp_path / "resumed")


def test_finished_run_is_reused(tmp_path):
    p1 = train_toy(tmp_path, iters=6, progress=False, **TINY)
    mtimes = {f: f.stat().st_mtime_ns for f in p1.parent.iterdir()}
    p2 = train_toy(tmp_path, iters=6, progress=False, **TINY)
    assert p1 == p2 and {f: f.stat().st_mtime_ns for f in p1.parent.iterdir()} == mtimes
    # A different config is another run in another folder.
    p3 = train_toy(tmp_path, iters=6, progress=False, **{**TINY, "hidden": 8})
    assert p3.parent != p1.parent
    # The result is a denoiser with the recipe's config inside.
    m = load_model(p1)
    assert m.checkpoint_info["meta"]["recipe"] == "toy" and m.checkpoint_info["step"] == 6
    assert ToyConfig.from_dict(m.checkpoint_info["meta"]) == ToyConfig(iters=6, **TINY)
    with torch.no_grad():
        assert m(torch.zeros(3, 2), torch.full((3,), 0.1)).shape == (3, 2)
    # A training state loads as its (non-averaged) network.
    net = load_model(p1.parent / "state.safetensors")
    state = load(p1.parent / "state.safetensors")[0]
    assert all(torch.equal(v, state[f"net/{k}"]) for k, v in net.state_dict().items())


def test_final_snapshot_rewritten_if_removed(tmp_path):
    p = train_toy(tmp_path, iters=4, progress=False, **TINY)
    data = p.read_bytes()
    os.remove(p)
    assert train_toy(tmp_path, iters=4, progress=False, **TINY) == p and p.read_bytes() == data


def test_run_dir_with_other_config_is_not_overwritten(tmp_path):
    cfg = ToyConfig(iters=3, **TINY)
    _run(tmp_path, cfg)
    other = ToyConfig(iters=3, **{**TINY, "batch": 64})
    with pytest.raises(GuidelabError):
        _run(tmp_path, other)


def test_unknown_override_is_one_clear_line(tmp_path):
    with pytest.raises(GuidelabError) as e:
        train_toy(tmp_path, iters=3, widht=3)
    assert "\n" not in str(e.value)


def test_step_generator_depends_only_on_seed_and_step():
    draw = lambda seed, step: torch.randn(4, generator=step_generator(seed, step))
    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(0, 6)) and not torch.equal(draw(0, 5), draw(1, 5))


def test_learning_rate_schedule():
    loop = LoopConfig(lr=0.01, lr_ref_steps=512)
    assert loop.lr_at(0) == loop.lr_at(512) == 0.01
    assert loop.lr_at(2048) == pytest.approx(0.005)


def test_paper_defaults():
    cfg = ToyConfig()
    assert (cfg.classes, cfg.batch, cfg.iters, cfg.lr, cfg.lr_ref_steps, cfg.betas) == ("A", 4096, 4096, 0.01, 512, (0.9, 0.99))
    assert (cfg.P_mean, cfg.P_std, cfg.ema, cfg.hidden, cfg.depth) == (-2.3, 1.5, (0.01,), 64, 4)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path):
    # A real kill -9 of a training process at an arbitrary moment, then resume in this process.
    import signal
    import subprocess
    import sys
    import time

    kw = dict(iters=400, **{**TINY, "snapshot_every": 50})
    code = (
        f"from guidelab.training import train_toy; "
        f"train_toy({str(tmp_path / 'killed')!r}, progress=False, checkpoint_every=7, **{kw!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "killed").glob("*/state.safetensors")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run = next((tmp_path / "killed").glob("*"))
    assert load(run / "state.safetensors")[1]["step"] < 400, "the process finished before it was killed"
    a = train_toy(tmp_path / "killed", progress=False, checkpoint_every=7, **kw)
    b = train_toy(tmp_path / "full", progress=False, checkpoint_every=7, **kw)
    ta, ca = load(a)
    tb, cb = load(b)
    assert ca == cb and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_init_weights_start_the_network_and_its_ema(tmp_path):
    cfg = ToyConfig(hidden=8, depth=1, iters=1, batch=16)
    start = {k: v + 0.5 for k, v in build(cfg.model()).state_dict().items()}
    trainer = Trainer(cfg.model(), toy_loss(cfg), cfg.loop(), init=start)
    for k, v in trainer.net.state_dict().items():
        assert torch.equal(v, start[k])
    for k, v in trainer.ema.model_state(trainer.net, 0).items():
        assert torch.equal(v, start[k])
