"""Guiders on a trained network: autoguidance with an earlier snapshot of the same run; TSG on ToyMLP."""

import torch

from guidelab import guidance as G
from guidelab import metrics, samplers, schedules, toy

N = 512
SIG = schedules.karras(32, 0.002, 5.0, dtype=torch.float32)


def _quality(denoiser):
    A = toy.tree("A")
    x0 = A.sample(N, 5.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = samplers.heun(denoiser, x0, SIG)
    ref = A.sample(N, 0.0, generator=torch.Generator().manual_seed(2))
    return metrics.precision_recall(ref, out)[0], metrics.mean_logp(A, out)


def test_autoguidance_with_an_earlier_snapshot_of_the_same_run(toy_snapshots):
    """Karras et al. 2024: the guide is the same model, trained shorter; guidance raises quality."""
    early, final = toy_snapshots
    p0, l0 = _quality(final)
    p1, l1 = _quality(G.autoguidance(final, early, 2.0))
    assert p1 > p0 + 0.05 and l1 > l0


def test_tsg_runs_on_toymlp_in_one_batched_call(toy_snapshots):
    _, final = toy_snapshots
    x = torch.randn(8, 2)
    sigma = torch.full((8,), 0.5)
    with torch.no_grad():
        plain = final(x, sigma)
        out = G.tsg(final, 2.0, s=0.5, seeds=range(8))(x, sigma)
    assert out.shape == plain.shape and not torch.equal(out, plain)
