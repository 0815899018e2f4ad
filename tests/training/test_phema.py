import numpy as np
import pytest
import torch

from guidelab.errors import GuidelabError
from guidelab.training import PowerEMA, load_model, sigma_rel_to_gamma
from guidelab.training.images import ImageConfig, train_images
from guidelab.training.phema import inner, profile_error, reconstruct, snapshots, solve_weights


def test_inner_product_matches_quadrature():
    for t_a, g_a, t_b, g_b in [(100, 6.9, 60, 16.9), (50, 2.0, 50, 0.5), (7, 0.0, 300, 3.3)]:
        tau = np.linspace(0, min(t_a, t_b), 200001)
        p = lambda t, g, tau=tau: (g + 1) * tau**g / t ** (g + 1)
        ref = np.trapezoid(p(t_a, g_a) * p(t_b, g_b), tau)
        assert inner(t_a, g_a, t_b, g_b) == pytest.approx(ref, rel=1e-6)


def _track(sigma_rels, T, every, seed=0):
    """PowerEMA over a random-walk trajectory; snapshots every ``every`` steps and the final EMAs."""
    net = torch.nn.Linear(3, 1, bias=False).double()
    ema = PowerEMA(net, sigma_rels)
    g = torch.Generator().manual_seed(seed)
    snaps = []
    with torch.no_grad():
        for t in range(1, T + 1):
            net.weight.add_(torch.randn(1, 3, generator=g, dtype=torch.float64))
            ema.update(net, t)
            if t % every == 0:
                snaps += [(t, ema.gammas[i], ema.params[i][0].clone()) for i in range(len(sigma_rels))]
    return snaps, [p[0].clone() for p in ema.params], ema.gammas


def test_tracked_profile_is_reproduced():
    snaps, final, gammas = _track((0.05, 0.10), T=512, every=64)
    ts, gs = [s[0] for s in snaps], [s[1] for s in snaps]
    for i in range(2):
        x = solve_weights(ts, gs, 512, gammas[i])
        expect = np.zeros(len(snaps))
        expect[len(snaps) - 2 + i] = 1  # the snapshot of that very profile at that step
        np.testing.assert_allclose(x, expect, atol=1e-6)
        assert profile_error(ts, gs, x, 512, gammas[i]) < 1e-6
        rec = sum(w * s[2] for w, s in zip(x, snaps))
        torch.testing.assert_close(rec, final[i], rtol=1e-6, atol=1e-6)


def test_untracked_profile_matches_direct_tracking():
    """An EMA of sigma_rel 0.07 rebuilt from 0.05 / 0.10 snapshots is the directly tracked 0.07 EMA
    up to a small part of the gap between its neighbours (a discrete EMA is the continuous profile
    integrated over each step, so only the least-squares residual is left)."""
    snaps, final, gammas = _track((0.05, 0.07, 0.10), T=1024, every=64, seed=3)
    used = [s for s in snaps if s[1] != gammas[1]]
    x = solve_weights([s[0] for s in used], [s[1] for s in used], 1024, gammas[1])
    rec = sum(w * s[2] for w, s in zip(x, used))
    gap = (final[0] - final[2]).abs().max()
    assert (rec - final[1]).abs().max() < 0.05 * gap
    assert profile_error([s[0] for s in used], [s[1] for s in used], x, 1024, gammas[1]) < 0.01


def test_reconstruct_from_a_run(tmp_path):
    cfg = ImageConfig(hidden=16, depth=1, emb=8, batch=16, iters=12, snapshot_every=4, lr_ref_steps=4)
    final = train_images(tmp_path, cfg, progress=False, plot=False)
    run = final.parent
    assert [(s, r) for _, s, r in snapshots(run)] == [(s, r) for s in (4, 8, 12) for r in (0.05, 0.10)]
    for step, sigma_rel in [(12, 0.05), (8, 0.10)]:
        m = reconstruct(run, sigma_rel, step=None if step == 12 else step)
        direct = load_model(run / f"ema-{step:07d}-{sigma_rel:g}.safetensors")
        assert m.checkpoint_info["phema_error"] < 1e-6 and m.checkpoint_info["step"] == step
        for k, v in direct.state_dict().items():
            torch.testing.assert_close(m.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    m = reconstruct(run, 0.07)
    assert m.checkpoint_info["gamma"] == pytest.approx(sigma_rel_to_gamma(0.07))
    assert sum(m.checkpoint_info["phema_weights"]) == pytest.approx(1, abs=0.05)
    with pytest.raises(GuidelabError, match="no EMA snapshots"):
        reconstruct(tmp_path, 0.05)
    with pytest.raises(GuidelabError, match="sigma_rel must be in"):
        reconstruct(run, 0.5)
    with pytest.raises(GuidelabError, match=r"step must be an integer in \[1, 12\]"):
        reconstruct(run, 0.05, step=99999)  # beyond the last snapshot: refused, not the last one
    (run / "ema-0000004-0.05junk.safetensors").write_bytes(b"junk")  # not a snapshot name: ignored
    assert len(snapshots(run)) == 6
