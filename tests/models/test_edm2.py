"""EDM2 network: equality with NVlabs' implementation, conditioning, checkpoints, training step."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from guidelab import guidance
from guidelab.errors import GuidelabError
from guidelab.models import build, config, edm2
from guidelab.training import load_model, save_model

REF = Path(__file__).resolve().parents[3] / "shared" / "reference" / "edm2" / "edm2_tiny_cond.safetensors"


def tiny(**kw) -> edm2.EDM2:
    """A small EDM2 network with non-zero gains (at init out_gain = 0 makes F = 0)."""
    args = dict(
        img_resolution=8,
        img_channels=3,
        label_dim=5,
        use_fp16=False,
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        channels_per_head=8,
        logvar_channels=8,
    )
    torch.manual_seed(0)
    net = edm2.EDM2(**{**args, **kw})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.copy_(torch.randn([]))
    return net.eval()


def batch(net, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0][:n])
    return x * (1 + sigma[:, None, None, None]), sigma


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(REF), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["precond_kwargs"])


def test_reference_equality(reference):
    t, kwargs = reference
    net = edm2.from_nvlabs(kwargs, {k[6:]: v for k, v in t.items() if k.startswith("param.")})
    x, sigma, y = t["input.x"], t["input.sigma"], t["input.class_labels"]
    c_skip, c_out, c_in, c_noise = net.precond.scalings(sigma)
    assert (net(x, sigma, class_labels=y) - t["output.D"]).abs().max() <= 1e-5
    assert (net.unet(c_in[:, None, None, None] * x, c_noise, y) - t["output.F"]).abs().max() <= 1e-5
    assert (net.logvar(sigma) - t["output.logvar"]).abs().max() <= 1e-5
    assert net.logvar(sigma).shape == (8,)
    # the whole file (param.* prefix), JSON kwargs and integer labels give the same network and outputs
    net2 = edm2.from_nvlabs(json.dumps(kwargs), t)
    assert torch.equal(net2(x, sigma, class_labels=y.argmax(1)), net(x, sigma, class_labels=y))


def test_from_nvlabs_refuses_mismatch(reference):
    t, kwargs = reference
    sd = {k[6:]: v for k, v in t.items() if k.startswith("param.")}
    with pytest.raises(GuidelabError, match="missing"):
        edm2.from_nvlabs(kwargs, {k: v for k, v in sd.items() if k != "unet.out_gain"})
    with pytest.raises(GuidelabError, match="expected"):
        edm2.from_nvlabs({**kwargs, "model_channels": 8}, sd)
    with pytest.raises(GuidelabError, match="not an EDM2 Precond"):
        edm2.from_nvlabs({**kwargs, "bogus": 1}, sd)


def test_labels_forms_and_null():
    net = tiny()
    x, sigma = batch(net)
    y = torch.tensor([0, 4, 2, 5])  # 5 = null
    onehot = torch.nn.functional.one_hot(y, 6)[:, :5].float()
    D = net(x, sigma, class_labels=y)
    assert torch.equal(D, net(x, sigma, class_labels=onehot))
    D_null = net(x, sigma, class_labels=torch.full((4,), 5))
    assert torch.equal(D_null, net(x, sigma))  # None = the zero vector
    assert torch.equal(D_null, net(x, sigma, class_labels=torch.zeros(4, 5)))
    assert torch.equal(D[3], D_null[3]) and not torch.equal(D[0], D_null[0])
    for bad, msg in (
        (torch.tensor([0, 1, 2, 6]), r"\[0, 5\]"),
        (torch.zeros(4, 3), "one-hot"),
        (torch.full((4, 5), 5.0), r"\[0, 1\]"),
        (torch.zeros(3, dtype=torch.long), "integers"),
    ):
        with pytest.raises(GuidelabError, match=msg):
            net(x, sigma, class_labels=bad)
    with pytest.raises(GuidelabError, match="class_labels, noise_embed_offset"):
        net(x, sigma, label=y)
    uncond = tiny(label_dim=0)
    assert uncond.condition is None and uncond.null_label is None
    with pytest.raises(GuidelabError, match="unconditional"):
        uncond(x, sigma, class_labels=y)


@pytest.mark.parametrize("form", ["int", "onehot"])
def test_cfg_uses_the_zero_label_as_null(form):
    net = tiny()
    x, sigma = batch(net)
    y = torch.tensor([0, 1, 2, 3])
    y = y if form == "int" else torch.nn.functional.one_hot(y, 5).float()
    assert net.condition.key == "class_labels" and net.condition.num_classes == 5
    got = guidance.cfg(net, 2.5)(x, sigma, class_labels=y)
    want = net(x, sigma).lerp(net(x, sigma, class_labels=y), 2.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_noise_embed_offset_reaches_only_the_embedding():
    net = tiny()
    x, sigma = batch(net)
    y = torch.tensor([0, 1, 2, 3])
    assert net.noise_embed_dim == 8
    c_skip, c_out, c_in, c_noise = net.precond.scalings(sigma)
    off = torch.tensor([0.5, -0.2, 0.1, 0.3])
    want = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * net.unet(
        c_in[:, None, None, None] * x, c_noise + off, net.one_hot(y, x)
    )
    torch.testing.assert_close(net(x, sigma, class_labels=y, noise_embed_offset=off), want, rtol=0, atol=1e-6)
    D = net(x, sigma, class_labels=y)
    assert torch.equal(net(x, sigma, class_labels=y, noise_embed_offset=torch.zeros(4, 8)), D)
    assert not torch.allclose(net(x, sigma, class_labels=y, noise_embed_offset=torch.randn(4, 8)), D)
    with pytest.raises(GuidelabError, match=r"\[batch, 8\]"):
        net(x, sigma, class_labels=y, noise_embed_offset=torch.zeros(4, 3))


def test_noise_cond_false():
    net = tiny(noise_cond=False)
    x, sigma = batch(net)
    y = net.one_hot(torch.tensor([0, 1, 2, 3]), x)
    assert net.noise_embed_dim is None and not any("emb_fourier" in k or "emb_noise" in k for k in net.state_dict())
    assert torch.equal(net.unet(x, torch.zeros(4), y), net.unet(x, torch.ones(4), y))
    D1, D2 = net(x, sigma), net(x, sigma * 2)
    assert not torch.allclose(D1, D2)  # the preconditioning still uses sigma
    assert net.logvar(sigma).shape == (4,) and not torch.equal(net.logvar(sigma), net.logvar(sigma * 2))
    with pytest.raises(GuidelabError, match="noise_cond"):
        net(x, sigma, noise_embed_offset=torch.zeros(4))
    bare = tiny(noise_cond=False, label_dim=0)  # no conditioning at all
    assert bare(x, sigma).shape == x.shape and not any("emb_" in k for k in bare.state_dict())


def test_checkpoint_round_trip(tmp_path):
    net = tiny(channel_mult=[1, 2, 2], res_balance=0.4, attn_balance=0.2, concat_balance=0.6, clip_act=None)
    x, sigma = batch(net)
    y = torch.tensor([0, 1, 2, 3])
    cfg = config(net)
    assert cfg["name"] == "EDM2" and json.loads(json.dumps(cfg)) == cfg
    assert set(build(cfg).state_dict()) == set(net.state_dict())
    path = save_model(tmp_path / "net.safetensors", net)
    back = load_model(path)
    assert torch.equal(back(x, sigma, class_labels=y), net(x, sigma, class_labels=y))
    assert torch.equal(back.logvar(sigma), net.logvar(sigma))


def test_magnitude_preserving_pieces():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, 8, 8, generator=g), torch.randn(64, 96, 8, 8, generator=g)

    def rms(t):
        return t.square().mean().sqrt().item()

    assert rms(edm2.mp_sum(a, b[:, :32], 0.3)) == pytest.approx(1, abs=0.02)
    assert rms(edm2.mp_cat(a, b, t=0.7)) == pytest.approx(1, abs=0.02)
    assert rms(edm2.mp_silu(a)) == pytest.approx(1, abs=0.02)
    assert rms(edm2.MPConv(32, 48, [1, 1])(a)) == pytest.approx(1, abs=0.05)  # (3x3: zero padding lowers the border)
    assert rms(edm2.MPConv(96, 16, [])(b.flatten(2).mean(2) * 8)) == pytest.approx(1, abs=0.1)
    assert rms(edm2.normalize(b * 7, dim=1)) == pytest.approx(1, abs=1e-3)
    f = edm2.MPFourier(4096)(torch.randn(16, generator=g))
    assert rms(f) == pytest.approx(1, abs=0.03)


def test_resample_fast_path_is_the_filter():
    x = torch.randn(2, 3, 8, 8)
    for mode in ("down", "up"):
        torch.testing.assert_close(edm2.resample(x, [1, 1], mode), edm2.filtered(x, [1, 1], mode), rtol=0, atol=1e-7)
    assert edm2.filtered(x, [1, 3, 3, 1], "down").shape == (2, 3, 4, 4)


def test_forced_weight_normalisation_and_training_step():
    net = tiny().train()
    conv = net.unet.enc["8x8_block0"].conv_res0
    with torch.no_grad():
        conv.weight.mul_(3.0)
    x, sigma = batch(net)
    y = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def loss():  # the EDM2 loss (eq. 21): lambda(sigma) / e^u ||D - x0||^2 + u
        x0 = x / (1 + sigma[:, None, None, None])
        n = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * sigma[:, None, None, None]
        err = (net(x0 + n, sigma, class_labels=y) - x0).square().flatten(1).mean(1)
        u = net.logvar(sigma)
        return (net.precond.loss_weight(sigma) / u.exp() * err + u).mean()

    first = loss()
    fan_in = conv.weight[0].numel()
    assert conv.weight.flatten(1).norm(dim=1).div(math.sqrt(fan_in)).sub(1).abs().max() < 1e-3  # renormalised in place
    opt.zero_grad()
    first.backward()
    assert net.logvar_linear.weight.grad.abs().sum() > 0 and net.unet.out_gain.grad != 0
    opt.step()
    assert loss().item() < first.item()
    net.eval()
    with torch.no_grad():
        conv.weight.mul_(3.0)
    w = conv.weight.clone()
    net(x, sigma, class_labels=y)
    assert torch.equal(conv.weight, w)  # eval mode leaves the weights alone


def test_bad_configs():
    with pytest.raises(GuidelabError, match="divisible"):
        edm2.EDM2(img_resolution=6, img_channels=3, label_dim=0, channel_mult=[1, 2, 2])
    with pytest.raises(GuidelabError, match="label_dim"):
        edm2.EDM2(img_resolution=8, img_channels=3, label_dim=-1)
    with pytest.raises(GuidelabError, match="x must be"):
        tiny()(torch.zeros(2, 1, 8, 8), torch.ones(2))
