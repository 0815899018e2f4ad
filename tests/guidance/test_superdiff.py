import pytest
import torch

from guidelab import schedules, toy
from guidelab.errors import GuidelabError
from guidelab.guidance import Branch
from guidelab.guidance.superdiff import superdiff
from guidelab.rng import SampleNoise
from guidelab.toy.mixture import GaussianMixture

COV = [[[0.02, 0.0], [0.0, 0.02]]] * 2
# Two overlapping mixtures: p1 has modes at x = -1 and 0, p2 at 0 and +1; both have density only at 0.
P1 = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [0.0, 0.0]], COV, dtype=torch.float64)
P2 = GaussianMixture([0.5, 0.5], [[0.0, 0.0], [1.0, 0.0]], COV, dtype=torch.float64)


def _start(n, seed=0):
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 10


def _mode_fractions(x):
    b = torch.bucketize(x[:, 0].contiguous(), torch.tensor([-0.5, 0.5], dtype=torch.float64))
    return (torch.bincount(b, minlength=3).double() / len(x)).tolist()


def test_or_samples_the_mixture_and_and_samples_where_both_have_density():
    n, sigmas = 1024, schedules.karras(64, 0.002, 10)
    x = _start(n)
    f_or = _mode_fractions(superdiff(P1, P2, x, sigmas, mode="or", noise=SampleNoise(range(n))))
    for got, want in zip(f_or, (0.25, 0.5, 0.25)):  # (p1 + p2) / 2
        assert abs(got - want) < 0.05, f_or
    out = superdiff(P1, P2, x, sigmas, mode="and", noise=SampleNoise(range(n)))
    assert _mode_fractions(out)[1] > 0.97
    both = torch.minimum(P1.logp(out), P2.logp(out))  # density under the weaker model
    assert float(both.mean()) > 0.0 > float(torch.minimum(P1.logp(x), P2.logp(x)).mean())


def test_ito_estimator_tracks_the_exact_log_density():
    n, sigmas = 512, schedules.karras(128, 0.002, 10)
    x = _start(n, seed=1)
    seen = {}
    _, logq = superdiff(
        P1, P2, x, sigmas, mode="or", noise=SampleNoise(range(n)), return_logq=True, callback=lambda d: seen.update(x=d["x"])
    )
    s_last = float(sigmas[-2])
    for j, p in enumerate((P1, P2)):
        true = p.logp(seen["x"], s_last) - p.logp(x, float(sigmas[0]))
        err = logq[j] - true
        # measured at 128 steps: |mean| ~0.5, std ~1 against a spread of ~11 nats (with the opposite sign
        # on |s|^2, as the official OR branch has, the error would be the whole sum of 2h|s|^2).
        assert abs(float(err.mean())) < 1.0 and float(err.std()) < 0.15 * float(true.std())


def test_cost_two_branches_of_one_network_in_one_batched_call_and_batch_invariance():
    ct, calls = toy.conditional_tree(dtype=torch.float64), []

    def net(x, sigma, label):
        calls.append(x.shape[0])
        return ct(x, sigma, label)

    n, sigmas = 6, schedules.karras(6, 0.01, 5)
    x = toy.tree("AB", dtype=torch.float64).sample(n, 5.0, generator=torch.Generator().manual_seed(2))
    a, b = Branch(net, {"label": 0}), Branch(net, {"label": 1})
    cond = {"label": torch.zeros(n, dtype=torch.long)}
    full = superdiff(a, b, x, sigmas, mode="and", cond=cond, noise=SampleNoise(range(n)))
    assert calls == [2 * n] * 6
    part = superdiff(
        a, b, x[2:5], sigmas, mode="and", cond={"label": torch.zeros(3, dtype=torch.long)}, noise=SampleNoise(range(2, 5))
    )
    torch.testing.assert_close(full[2:5], part, rtol=1e-12, atol=1e-12)


def test_and_keeps_the_two_log_densities_equal_also_in_the_guided_form():
    n, sigmas = 64, schedules.karras(32, 0.002, 10)
    x = _start(n, seed=4)
    wide = GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    for kw in ({}, {"uncond": wide, "w": 2.0}):
        _, logq = superdiff(P1, P2, x, sigmas, mode="and", noise=SampleNoise(range(n)), return_logq=True, **kw)
        assert float(logq.abs().max()) > 1.0  # the densities do change ...
        torch.testing.assert_close(logq[0], logq[1], rtol=0, atol=1e-6)  # ... by the same amount


def test_same_model_twice_or_and_and_agree():
    # q_1 = q_2: OR is kappa-independent, AND's kappa multiplies delta = 0; both are the model's own SDE.
    n, sigmas = 64, schedules.karras(32, 0.002, 10)
    x = _start(n, seed=3)
    a = superdiff(P1, P1, x, sigmas, mode="or", noise=SampleNoise(range(n)))
    b = superdiff(P1, P1, x, sigmas, mode="and", noise=SampleNoise(range(n)))
    torch.testing.assert_close(a, b)
    assert _mode_fractions(a)[2] == 0.0


def test_user_errors():
    sigmas, x = schedules.karras(4, 0.01, 1.0), torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(GuidelabError, match="mode"):
        superdiff(P1, P2, x, sigmas, mode="xor")
    with pytest.raises(GuidelabError, match="uncond"):
        superdiff(P1, P2, x, sigmas, w=2.0)
