"""Time-step guidance (Sadat et al. 2025) improves an unconditional model on the exact tree world.

TSG's reference branch is the same network with a randomly perturbed noise embedding. Perturbed along a
random direction of the embedding *vector* (the paper's form; ToyMLP's is the first layer's image of
c_noise, ``dim = hidden``), the reference is a degraded prediction and guiding away from it sharpens,
as autoguidance does.
"""

import pytest
import torch

from guidelab import guidance as G
from guidelab import metrics, samplers, schedules, toy
from guidelab.rng import SampleNoise
from guidelab.training import load_model, train_toy

SIG = schedules.karras(32, 0.002, 5.0, dtype=torch.float32)
N = 2048


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An undertrained unconditional ToyMLP (classes A and B, 300 iterations, ~3 s)."""
    path = train_toy(
        tmp_path_factory.mktemp("tsg"),
        classes="AB",
        hidden=32,
        depth=3,
        output="denoiser",
        loss="edm",
        iters=300,
        batch=512,
        snapshot_every=100,
        progress=False,
        threads=1,
    )
    return load_model(path)


def _quality(denoiser, seed):
    world = toy.tree("AB")
    x = world.sample(N, 5.0, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = samplers.heun(denoiser, x, SIG, noise=SampleNoise(range(N)))  # the run's seeds feed TSG's draws
    ref = world.sample(4096, 0.0, generator=torch.Generator().manual_seed(99))
    return (metrics.mean_logp(world, out), *metrics.precision_recall(ref, out))


def test_vector_tsg_improves_an_unconditional_model(model):
    base = _quality(model, 1)
    tsg = _quality(G.tsg(model, 3.0, s=0.3, alpha=0.0, dim=model.hidden), 1)
    print(f"\nunguided log p {base[0]:.2f} P {base[1]:.3f} R {base[2]:.3f}; TSG {tsg[0]:.2f} {tsg[1]:.3f} {tsg[2]:.3f}")
    assert tsg[0] > base[0] + 1.0  # mean exact log-density of the samples
    assert tsg[1] > base[1] + 0.01  # k-NN precision
    assert tsg[2] > base[2] - 0.01  # ... without losing recall


def test_vector_offset_reaches_only_the_reference_branch_and_is_batch_size_invariant(model):
    seen = []
    fwd = model.forward

    def spy(x, sigma, noise_embed_offset=None):
        seen.append(noise_embed_offset)
        return fwd(x, sigma, noise_embed_offset=noise_embed_offset)

    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((64,), 0.3)
    g = G.tsg(spy, 3.0, s=0.3, alpha=0.0, dim=model.hidden, seeds=range(64))
    with torch.no_grad():
        full = g(x, sigma)
        part = G.tsg(spy, 3.0, s=0.3, alpha=0.0, dim=model.hidden, seeds=range(10, 20))(x[10:20], sigma[10:20])
    off = seen[0]
    assert off.shape == (128, model.hidden) and torch.equal(off[:64], torch.zeros(64, model.hidden))
    assert abs(float(off[64:].std()) - 0.3) < 0.03  # s t^0 n, n ~ N(0, I) in R^hidden
    torch.testing.assert_close(part, full[10:20], rtol=1e-5, atol=1e-6)
