"""Autoguidance with a cheaper copy as the guide (lower precision, pruned), and every single-network guide
measured against a real weaker network on the exact tree."""

import pytest
import torch

from guidelab import guidance as G
from guidelab import metrics, samplers, schedules, toy
from guidelab.errors import GuidelabError
from guidelab.guidance import registry
from guidelab.guidance.weak_copy import lowp_copy, pruned_copy
from guidelab.models import build


def _pixelmlp():
    torch.manual_seed(0)
    net = build({"name": "PixelMLP", "hidden": 32, "depth": 2, "emb": 16, "num_classes": 10})
    with torch.no_grad():
        net.out.weight.normal_(0, 0.1)
    return net.eval()


def _inputs(n=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.full((n,), 0.5), torch.arange(n)


def test_lowp_copy_rounds_every_weight_and_leaves_the_network():
    net = _pixelmlp()
    before = {k: v.clone() for k, v in net.named_parameters()}
    cp = lowp_copy(net, "bf16")
    for k, v in cp.named_parameters():
        assert torch.equal(v, before[k].to(torch.bfloat16).float())
        assert torch.equal(dict(net.named_parameters())[k], before[k])
    assert not torch.equal(cp.fc1[0].weight, net.fc1[0].weight)


def test_pruned_copy_zeroes_the_smallest_fraction_of_each_matrix():
    net = _pixelmlp()
    cp = pruned_copy(net, 0.25)
    w, w0 = cp.fc1[0].weight, net.fc1[0].weight
    k = round(0.25 * w.numel())
    assert int((w == 0).sum()) == k
    assert w0.abs()[w == 0].max() <= w0.abs()[w != 0].min()
    assert torch.equal(cp.fc1[0].bias, net.fc1[0].bias)  # biases kept
    assert torch.equal(w[w != 0], w0[w != 0])


@pytest.mark.parametrize("make", [lambda n: G.lowp_autoguidance(n, 1.0), lambda n: G.pruned_autoguidance(n, 1.0)])
def test_w1_is_the_main_network_bit_for_bit(make):
    net = _pixelmlp()
    x, s, y = _inputs()
    with torch.no_grad():
        assert torch.equal(make(net)(x, s, label=y), net(x, s, label=y))


def test_guided_is_the_lerp_towards_the_copy():
    net = _pixelmlp()
    x, s, y = _inputs()
    with torch.no_grad():
        D, D0 = net(x, s, label=y), pruned_copy(net, 0.5)(x, s, label=y)
        out = registry.build("autoguidance_pruned", registry.Context(net, w=2.5, options=["fraction=0.5"]))(x, s, label=y)
    torch.testing.assert_close(out, D0.lerp(D, 2.5))


def test_the_copy_is_rebuilt_after_the_weights_change():
    net = _pixelmlp()
    x, s, y = _inputs()
    with torch.no_grad():
        a = G.pruned_autoguidance(net, 2.0)(x, s, label=y)
        net.out.weight.mul_(2)
        b = G.pruned_autoguidance(net, 2.0)(x, s, label=y)
        ref = pruned_copy(net, 0.3)(x, s, label=y).lerp(net(x, s, label=y), 2.0)
    assert not torch.equal(a, b)
    torch.testing.assert_close(b, ref)


def test_misuse_is_refused():
    net = _pixelmlp()
    with pytest.raises(GuidelabError, match="fraction"):
        G.pruned_autoguidance(net, 2.0, fraction=1.5)
    with pytest.raises(GuidelabError, match="dtype"):
        G.lowp_autoguidance(net, 2.0, dtype="int4")
    with pytest.raises(GuidelabError, match="no option"):
        registry.build("autoguidance_lowp", registry.Context(net, w=2.0, options=["fraction=0.1"]))


# ---------------------------------------------------------------------------------------------
# The exact tree: a ToyMLP trained in the test, guided by a real weaker network (the same run's EMA
# snapshot at 40 of 300 steps, Karras et al.'s "shorter training") and by each single-network guide.

N = 1024
SIG = schedules.karras(32, 0.002, 5.0, dtype=torch.float32)


def _quality(den):
    A = toy.tree("A")
    x = A.sample(N, 5.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = samplers.heun(den, x, SIG, noise=None)
    ref = A.sample(N, 0.0, generator=torch.Generator().manual_seed(2))
    p, r = metrics.precision_recall(ref, out)
    return float(p), float(r), float(metrics.mean_logp(A, out))


def measure(early, final):
    """Precision, recall, mean exact log p of each guide (docs/GUIDANCE.md's table)."""
    rows = {
        "none": final,
        "weaker network w=2": G.autoguidance(final, early, 2.0),
        "weaker network w=1.5": G.autoguidance(final, early, 1.5),
        "skip block 0 w=1.5": G.self_guidance(final, 1.5, blocks=["0"]),
        "skip block 1 w=1.5": G.self_guidance(final, 1.5, blocks=["1"]),
        "dropout 0.1 w=2": G.self_guidance(final, 2.0, mode="dropout", p=0.1, seeds=range(N)),
        "bf16 copy w=2": G.lowp_autoguidance(final, 2.0),
        "pruned 0.3 w=2": G.pruned_autoguidance(final, 2.0, fraction=0.3),
    }
    return {k: _quality(v) for k, v in rows.items()}


@pytest.mark.slow  # trains a ToyMLP and samples 8 x 1024 points: about 8 s quiet, 30 s loaded
def test_single_network_guides_against_a_real_weaker_network_on_the_tree(toy_snapshots):
    early, final = toy_snapshots
    q = measure(early, final)
    base, real = q["none"], q["weaker network w=2"]
    assert real[0] > base[0] + 0.05 and real[2] > base[2]  # the real weaker guide raises quality
    # skipping the first hidden layer acts like the weaker network at the same weight; the middle one does not
    skip0, skip1, weak = q["skip block 0 w=1.5"], q["skip block 1 w=1.5"], q["weaker network w=1.5"]
    assert skip0[0] > base[0] + 0.03 and skip0[2] > base[2] and abs(skip0[2] - weak[2]) < abs(weak[2] - base[2])
    assert skip1[2] < base[2]
    # bf16 rounding barely changes the network: its guide is nearly no guidance at all
    assert abs(q["bf16 copy w=2"][2] - base[2]) < abs(real[2] - base[2])
