"""CADS on a guidelab image network's integer labels: the label's one-hot is annealed inside the
embedding layer (equal to the network's own label path fed the annealed vector), only on rows that carry
the sample's own label (the null branch and a Perp-Neg negative keep theirs), bit-identical where
gamma = 1, hooks gone after every call."""

import math

import pytest
import torch

from guidelab import guidance as G
from guidelab.errors import GuidelabError
from guidelab.models.image import PixelMLP, UNet

torch.manual_seed(0)
NET = PixelMLP(img_resolution=4, hidden=32, depth=2, emb=16, num_classes=3).double().eval()
with torch.no_grad():  # random weights everywhere (the output layer starts at zero: D would not see the label)
    for p in NET.parameters():
        p.normal_(0.0, 0.3)
B = 6
X = torch.randn(B, 1, 4, 4, dtype=torch.float64)
S = torch.full((B,), 1.3, dtype=torch.float64)
LAB = torch.tensor([0, 1, 2, 0, 1, 2])
SIGMAS = torch.linspace(5, 0, 11, dtype=torch.float64)  # N = 10 steps: t = 1 - i / 10


def _unet():
    torch.manual_seed(1)
    net = UNet(img_resolution=4, hidden=8, depth=1, channel_mult=(1,), attn_resolutions=(), emb=16, num_classes=3)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    return net.double().eval()


def _with_label_vector(net, vec, x, sigma):
    """``net`` with its own label features replaced by ``vec`` * sqrt(K + 1) (its one-hot scale)."""
    net._label = lambda label, x_: [vec * math.sqrt(net.num_classes + 1)]
    try:
        return net(x, sigma, label=LAB)
    finally:
        del net._label


@pytest.mark.parametrize("kind", ["PixelMLP", "UNet"])
def test_annealed_label_equals_the_networks_own_label_path_and_nulls_are_untouched(kind):
    net = NET if kind == "PixelMLP" else _unet()
    g = G.cads(G.cfg(net, 3.0), tau1=0.3, tau2=0.9, noise_scale=0.0, psi=None)
    run = G.Run(X, SIGMAS)
    bound = g.start(run)
    onehot = torch.nn.functional.one_hot(LAB, 4).double()
    D_u = net(X, S, label=torch.full((B,), 3))
    assert not torch.allclose(D_u, net(X, S, label=LAB))  # the label matters
    for i in run.steps():
        got = bound(X, S, label=LAB)
        gam = G.cads.__globals__["gamma"](1 - i / 10, 0.3, 0.9)
        if gam == 1:
            assert torch.equal(got, G.cfg(net, 3.0)(X, S, label=LAB)), i
        else:
            ref = D_u.lerp(_with_label_vector(net, math.sqrt(gam) * onehot, X, S), 3.0)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
        assert not net._forward_pre_hooks and not net.emb_layer._forward_pre_hooks  # hooks removed
        if i == 5:
            break


def test_a_perp_neg_negative_keeps_its_label():
    neg = (LAB + 1) % 3  # a negative differs from the sample's label (rows are told apart by their label)
    base = G.perp_neg(G.cfg(NET, 3.0), {"label": neg}, neg_w=1.0)
    g = G.cads(base, tau1=0.3, tau2=0.9, noise_scale=0.5, psi=1.0, seeds=range(B))
    run = G.Run(X, SIGMAS)
    bound = g.start(run)
    seen = []
    hook = NET.emb_layer.register_forward_hook(lambda m, a, out: seen.append(a[0].clone()))  # after the pre-hooks
    try:
        next(iter(run.steps()))  # step 0: t = 1, gamma = 0 (pure noise on the own label)
        bound(X, S, label=LAB)
    finally:
        hook.remove()
    inp = seen[0]  # rows [main B; null B; negative B]; the label columns are the last 4
    lab_cols = inp[:, -4:] / 2.0  # the network scales its one-hot by sqrt(4)
    plain = torch.nn.functional.one_hot(torch.cat([torch.full((B,), 3), neg]), 4).double()
    assert torch.equal(lab_cols[B:], plain)  # null and negative rows: their own one-hot
    assert not torch.allclose(lab_cols[:B], torch.nn.functional.one_hot(LAB, 4).double())  # main rows annealed


def test_seeded_per_sample_and_refused_without_a_label_network():
    def run_once():
        run = G.Run(X, SIGMAS, seeds=range(B))
        bound = G.cads(G.cfg(NET, 2.0)).start(run)
        next(iter(run.steps()))
        return bound(X, S, label=LAB)

    a, b = run_once(), run_once()
    assert torch.equal(a, b) and not torch.allclose(a, G.cfg(NET, 2.0)(X, S, label=LAB))

    def plain(x, sigma, label):  # not a guidelab image network: integer labels cannot be annealed
        return x * 0

    plain.condition = G.Condition("label", {"label": 3}, 3)
    with pytest.raises(GuidelabError, match="integer labels of a guidelab image network"):
        G.cads(G.cfg(plain, 2.0)).start(G.Run(X, SIGMAS))(X, S, label=LAB)
