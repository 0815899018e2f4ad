"""The self-perceptual objective (training.perceptual): neutral at weight 0, zero for a perfect prediction,
the features it compares, and a tiny fine-tuning run through `guidelab train`'s config keys."""

import pytest
import torch

from guidelab.denoisers import edm_loss
from guidelab.errors import GuidelabError
from guidelab.models import build
from guidelab.training import load_model
from guidelab.training.images import ImageConfig, train_images
from guidelab.training.perceptual import default_layer, features, self_perceptual_loss


def _net(seed=0):
    torch.manual_seed(seed)
    net = build({"name": "PixelMLP", "hidden": 32, "depth": 2, "emb": 16, "num_classes": 10})
    with torch.no_grad():
        net.out.weight.normal_(0, 0.1)
    return net


def _batch(n=16):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    sigma = torch.exp(torch.randn(n, generator=g) * 1.2 - 1.2)
    return x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g), sigma, x0, torch.arange(n) % 10


KW = dict(P_mean=-1.2, P_std=1.2)


def test_weight_zero_is_the_edm_loss_bit_for_bit():
    net = _net()
    x, s, x0, y = _batch()
    out = self_perceptual_loss(net, None, x, s, x0, net.precond, weight=0.0, gen=torch.Generator(), label=y, **KW)
    assert torch.equal(out, edm_loss(net, x, s, x0, net.precond, label=y))


def test_a_perfect_prediction_has_zero_loss_and_a_wrong_one_does_not():
    net, frozen = _net(), _net(1).eval()
    x, s, x0, y = _batch()
    with pytest.raises(GuidelabError, match="must not require gradients"):
        self_perceptual_loss(net, frozen, x, s, x0, net.precond, weight=1.0, gen=torch.Generator(), label=y, **KW)
    frozen.requires_grad_(False)

    class Oracle(torch.nn.Module):
        def forward(self, x_, s_, label=None):
            return x0 + 0 * x_

    loss = self_perceptual_loss(
        Oracle(), frozen, x, s, x0, net.precond, weight=1.0, gen=torch.Generator().manual_seed(3), label=y, **KW
    )
    assert torch.equal(loss, torch.zeros_like(loss))
    loss = self_perceptual_loss(
        net, frozen, x, s, x0, net.precond, weight=1.0, gen=torch.Generator().manual_seed(3), label=y, **KW
    )
    assert bool((loss > 0).all())
    loss.mean().backward()  # the gradient reaches the online network through the frozen one
    assert net.fc1[0].weight.grad is not None and net.fc1[0].weight.grad.abs().sum() > 0


def test_features_are_the_residual_stream_after_the_middle_block():
    net = _net().eval()
    x, s, _, y = _batch(4)
    assert default_layer(net) == "norms.1"
    grab = {}
    h = net.norms[1].register_forward_pre_hook(lambda m, a: grab.setdefault("h", a[0]))
    with torch.no_grad():
        f = features(net, "norms.1", x, s, {"label": y})
        net(x, s, label=y)
    h.remove()
    assert torch.equal(f, grab["h"].flatten(1))
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(GuidelabError, match="unknown perceptual layer"):
        features(net, "nope", x, s, {"label": y})


def test_config_checks():
    with pytest.raises(GuidelabError, match="init"):
        ImageConfig(perceptual=1.0)
    with pytest.raises(GuidelabError, match="perceptual"):
        ImageConfig(perceptual=2.0, init="x.safetensors")
    assert ImageConfig(perceptual=0.0).name() == ImageConfig().name()


@pytest.mark.slow  # two tiny trainings: about 3 s on a quiet machine, 17 s on a loaded one
def test_tiny_fine_tune_lowers_the_perceptual_distance(tmp_path):
    """A short MSE run, then the self-perceptual fine-tune from it (through the config keys of `guidelab
    train`): its training loss falls, and on held-out digits the frozen copy's feature distance between the
    noised prediction and the noised image is below the starting model's."""
    from guidelab.data import digits
    from guidelab.training.checkpoint import load

    base = dict(hidden=32, depth=2, emb=16, batch=64, snapshot_every=64, ema=(0.05,))
    start = train_images(tmp_path / "a", ImageConfig(iters=128, lr=2e-3, **base), progress=False, plot=False)
    cfg = ImageConfig(iters=64, lr=3e-4, init=str(start), perceptual=1.0, **base)
    tuned = train_images(tmp_path / "b", cfg, progress=False, plot=False)
    assert "digits-PixelMLP-h32-i64" in tuned.parent.name
    log = load(tuned.parent / "state.safetensors")[0]["log/loss"]
    assert float(log[-16:].mean()) < float(log[:16].mean())
    frozen, m0, m1 = load_model(start).eval().requires_grad_(False), load_model(start).eval(), load_model(tuned).eval()
    test = digits("test")
    g = torch.Generator().manual_seed(0)
    x0, y = test.images[:256], test.labels[:256]
    s = torch.exp(torch.randn(len(x0), generator=g) * 1.2 - 1.2)
    x = x0 + s[:, None, None, None] * torch.randn(x0.shape, generator=g)

    def dist(m):
        with torch.no_grad():
            gen = torch.Generator().manual_seed(5)
            return float(self_perceptual_loss(m, frozen, x, s, x0, m.precond, weight=1.0, gen=gen, label=y, **KW).mean())

    assert dist(m1) < dist(m0)
