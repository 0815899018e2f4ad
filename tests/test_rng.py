import pytest
import torch

from guidelab import rng, samplers, schedules, toy
from guidelab.errors import GuidelabError


def test_sample_noise_rows_depend_only_on_their_seed():
    a = rng.SampleNoise([3, 4, 5]).randn([2, 2])
    b = rng.SampleNoise([5]).randn([2, 2])
    assert torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])


def test_sample_noise_rejects_mismatched_batch():
    with pytest.raises(ValueError):
        rng.SampleNoise([1, 2]).sampler(torch.zeros(3, 2))
    with pytest.raises(ValueError):
        rng.SampleNoise([])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: rng.SampleNoise([1, 2]).sampler(torch.zeros(3, 2)), "batch 3"),
        (lambda: rng.SampleNoise([]), "at least one seed"),
        (lambda: rng.SampleNoise([1 << 64]), "64-bit"),
    ],
)
def test_sample_noise_misuse_is_a_guidelab_error(call, message):
    with pytest.raises(GuidelabError, match=message):
        call()


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_same_seeds_same_samples_at_any_batch_size(sampler):
    """Per-sample seeds: the stochastic (churn) EDM sampler is bit-identical at batch sizes 1, 7 and 64."""
    world = toy.tree("A")
    sigmas = schedules.karras(12, 0.002, 5.0)
    seeds = list(range(100, 164))

    def run(batch_seeds):
        noise = rng.SampleNoise(batch_seeds)
        x = noise.randn([2]) * sigmas[0].float()
        return samplers.get(sampler)(world, x, sigmas, s_churn=20.0, noise=noise)

    full = run(seeds)
    sevens = torch.cat([run(seeds[i : i + 7]) for i in range(0, 64, 7)])
    ones = torch.cat([run([s]) for s in seeds[:9]])
    assert torch.equal(full, sevens)
    assert torch.equal(full[:9], ones)
    # ...and the noise really is used: other seeds give other samples.
    assert not torch.equal(full, run([s + 1000 for s in seeds]))


def test_sample_noise_is_standard_normal_and_independent_across_seeds_and_draws():
    from scipy import stats

    noise = rng.SampleNoise(range(4000))
    a, b = noise.randn([64]).double(), noise.randn([64]).double()
    assert stats.kstest(a.flatten().numpy(), "norm").pvalue > 1e-3
    # Neighbouring seeds, successive draws and neighbouring elements are uncorrelated.
    for u, v in ((a[:-1], a[1:]), (a, b), (a[:, :-1], a[:, 1:])):
        assert abs(torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1]) < 0.01


def test_sample_noise_draws_are_a_stream():
    """Two draws of 3 equal one draw of 6: the values depend on the counter, not on the call pattern."""
    one, two = rng.SampleNoise([7, 8]), rng.SampleNoise([7, 8])
    assert torch.equal(torch.cat([one.randn([3]), one.randn([3])], 1), two.randn([6]))


def test_values_computed_ahead_change_nothing(monkeypatch):
    """A small draw computes the next draws' values too; with that switched off every value, dtype and shape is the
    same, whatever the mix of shapes, dtypes and large draws in between, and a caller writing into a draw
    changes no later draw."""

    def draws():
        noise, out = rng.SampleNoise(range(5, 70)), []
        for shape, dtype in [([2], torch.float32)] * 40 + [([3, 5], torch.float64)] * 3 + [([200], torch.float32)]:
            out.append(noise.randn(shape, dtype))
            out[-1].mul_(0) if len(out) % 7 == 0 else None  # samplers may modify their noise in place
        return out + [noise.randn([2], torch.float64) for _ in range(20)] + [noise.randn([1]) for _ in range(9)]

    ahead = draws()
    monkeypatch.setattr(rng, "_AHEAD_DRAWS", 1)
    plain = draws()
    assert len(ahead) == len(plain) == 73
    assert all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(ahead, plain))
