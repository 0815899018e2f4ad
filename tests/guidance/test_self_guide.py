"""Autoguidance with the network itself as the guide: blocks skipped or dropped out (guidance.self_guide)."""

import copy

import pytest
import torch

from guidelab import guidance as G
from guidelab.errors import GuidelabError
from guidelab.guidance import registry
from guidelab.guidance.self_guide import blocks
from guidelab.models import build


def _pixelmlp(seed=0):
    torch.manual_seed(seed)
    net = build({"name": "PixelMLP", "hidden": 32, "depth": 4, "emb": 16, "num_classes": 10})
    with torch.no_grad():  # the output layer is zero-initialised: give it weights so the blocks matter
        net.out.weight.normal_(0, 0.1)
    return net.eval()


def _edm2():
    torch.manual_seed(0)
    net = build(
        {
            "name": "EDM2",
            "img_resolution": 8,
            "img_channels": 1,
            "label_dim": 10,
            "use_fp16": False,
            "model_channels": 16,
            "channel_mult": [1, 2],
            "num_blocks": 1,
            "attn_resolutions": [],
            "channels_per_head": 16,
        }
    ).eval()
    with torch.no_grad():  # the output and embedding gains start at zero: give them weight
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5)
    return net


def _inputs(n=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return x, torch.full((n,), 0.7), torch.arange(n) % 10


def _no_hooks(net):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


class _Calls:
    def __init__(self, net):
        self.net, self.rows = net, []

    def __call__(self, x, sigma, **cond):
        self.rows.append(x.shape[0])
        return self.net(x, sigma, **cond)


@pytest.mark.parametrize("mode", ["skip", "dropout"])
@pytest.mark.parametrize("make", [_pixelmlp, _edm2])
def test_w1_is_the_main_network_bit_for_bit(mode, make):
    net = make()
    x, s, y = _inputs()
    key = getattr(net.condition, "key", "label")
    with torch.no_grad():
        ref = net(x, s, **{key: y})
        out = G.self_guidance(net, 1.0, mode=mode, seeds=range(6))(x, s, **{key: y})
    assert torch.equal(out, ref)


@pytest.mark.parametrize("mode", ["skip", "dropout"])
@pytest.mark.parametrize("make", [_pixelmlp, _edm2])
def test_guide_differs_one_batched_call_and_no_hook_left(mode, make):
    net = make()
    x, s, y = _inputs()
    key = getattr(net.condition, "key", "label")
    calls = _Calls(net)
    guided = G.self_guidance(calls, 2.0, mode=mode, seeds=range(6))
    with torch.no_grad():
        main = net(x, s, **{key: y})
        out = guided(x, s, **{key: y})
    assert calls.rows == [12]  # main and guide rows in one call
    assert not torch.allclose(out, main, atol=1e-6)
    assert _no_hooks(net)
    with torch.no_grad():  # and the network is unchanged afterwards
        assert torch.equal(net(x, s, **{key: y}), main)


def test_skip_equals_the_network_with_that_residual_branch_removed():
    """PixelMLP: skipping block i is the same network with fc2[i] zeroed (reference equality)."""
    net = _pixelmlp()
    ref_net = copy.deepcopy(net)
    with torch.no_grad():
        ref_net.fc2[2].weight.zero_()
        ref_net.fc2[2].bias.zero_()
    x, s, y = _inputs()
    w = 3.0
    with torch.no_grad():
        D, D0 = net(x, s, label=y), ref_net(x, s, label=y)
        out = G.self_guidance(net, w, blocks=["2"])(x, s, label=y)
    torch.testing.assert_close(out, D0.lerp(D, w), rtol=1e-5, atol=1e-6)


def test_skip_of_an_edm2_block_is_output_equals_input():
    net = _edm2()
    name = next(iter(blocks(net)))
    module = blocks(net)[name][0]
    x, s, y = _inputs()
    h = module.register_forward_hook(lambda m, a, o: a[0])
    with torch.no_grad():
        D0 = net(x, s, class_labels=y)
    h.remove()
    with torch.no_grad():
        D = net(x, s, class_labels=y)
        out = G.self_guidance(net, 2.0, blocks=[name])(x, s, class_labels=y)
    torch.testing.assert_close(out, D0.lerp(D, 2.0), rtol=1e-5, atol=1e-6)


def test_dropout_masks_are_per_sample_batch_invariant():
    net = _pixelmlp()
    x, s, y = _inputs(6)
    with torch.no_grad():
        full = G.self_guidance(net, 2.0, mode="dropout", p=0.3, seeds=[10, 11, 12, 13, 14, 15])(x, s, label=y)
        part = G.self_guidance(net, 2.0, mode="dropout", p=0.3, seeds=[12, 13])(x[2:4], s[2:4], label=y[2:4])
        other = G.self_guidance(net, 2.0, mode="dropout", p=0.3, seeds=[99, 98])(x[2:4], s[2:4], label=y[2:4])
    torch.testing.assert_close(part, full[2:4], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other, part)


def test_hooks_are_removed_when_the_call_fails():
    net = _pixelmlp()
    x, s, _ = _inputs()
    with pytest.raises(GuidelabError):
        G.self_guidance(net, 2.0)(x, s, label=torch.zeros(6), colour=1)  # an unknown conditioning key
    assert _no_hooks(net)


def test_misuse_is_refused():
    net = _pixelmlp()
    with pytest.raises(GuidelabError, match="unknown block"):
        G.self_guidance(net, 2.0, blocks=["7"])
    with pytest.raises(GuidelabError, match="mode"):
        G.self_guidance(net, 2.0, mode="zero")
    with pytest.raises(GuidelabError, match="dropout p"):
        G.self_guidance(net, 2.0, mode="dropout", p=1.0)
    with pytest.raises(GuidelabError, match="torch network"):
        G.self_guidance(lambda x, s: x, 2.0)


def test_registry_builds_them_with_options():
    net = _pixelmlp()
    x, s, y = _inputs()
    with torch.no_grad():
        a = registry.build("autoguidance_skip", registry.Context(net, w=2.0, options=["blocks=1,3"]))(x, s, label=y)
        b = G.self_guidance(net, 2.0, blocks=["1", "3"])(x, s, label=y)
    assert torch.equal(a, b)
    d = registry.build("autoguidance_dropout", registry.Context(net, w=2.0, seeds=range(6), options=["p=0.2"]))
    assert d(x, s, label=y).shape == x.shape
