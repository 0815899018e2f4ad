"""The noise-unconditional preset (Sun et al. 2025; configs/digits-noise-uncond.json): the network F never
sees sigma, only EDM's preconditioning does."""

import json
from pathlib import Path

import pytest
import torch

from guidelab.models import registry
from guidelab.training.images import ImageConfig, load_data, model_config

PRESET = Path(__file__).resolve().parents[2] / "configs" / "digits-noise-uncond.json"


def build(cfg: ImageConfig):
    torch.manual_seed(0)
    net = registry.build(model_config(cfg, load_data(cfg))).eval()
    with torch.no_grad():  # the output layer is zero at init (F = 0): give F a real output
        net.out.weight.normal_(0, 0.05)
        net.out.bias.normal_(0, 0.05)
    return net


def raw_output(net, x_in, sigma, **cond):
    """F(x_in) recovered from D: feed x = x_in / c_in(sigma), return (D - c_skip x) / c_out."""
    c_skip, c_out, c_in, _ = net.precond.scalings(sigma)
    x = x_in / c_in[:, None, None, None]
    return (net(x, sigma, **cond) - c_skip[:, None, None, None] * x) / c_out[:, None, None, None]


@pytest.fixture(scope="module")
def preset():
    return ImageConfig.from_dict(json.loads(PRESET.read_text()))


def test_preset_is_the_default_recipe_without_noise_conditioning(preset):
    default = ImageConfig()
    assert preset.noise_cond is False
    # same data, network, loss, optimiser and EMA as the default run: only noise_cond and the length differ
    same = {k: v for k, v in vars(preset).items() if k not in ("noise_cond", "iters")}
    assert same == {k: v for k, v in vars(default).items() if k not in ("noise_cond", "iters")}
    assert preset.iters <= default.iters


def test_network_output_does_not_depend_on_sigma(preset):
    net = build(preset)
    assert net.noise_cond is False and net.noise_fourier is None
    g = torch.Generator().manual_seed(1)
    x_in = torch.randn(6, 1, 8, 8, generator=g)
    label = torch.tensor([0, 1, 2, 3, 10, 10])                      # 10: the null label
    with torch.no_grad():
        outs = [raw_output(net, x_in, torch.full((6,), s), label=label) for s in (0.01, 0.5, 3.0, 80.0)]
        for o in outs[1:]:
            torch.testing.assert_close(o, outs[0], rtol=1e-4, atol=1e-4)
        # D itself depends on sigma through the preconditioning: for the same x, c_skip x + c_out F(c_in x)
        x = x_in * 2
        d1 = net(x, torch.full((6,), 0.1), label=label)
        d2 = net(x, torch.full((6,), 2.0), label=label)
        assert (d1 - d2).abs().max() > 0.1
        # ... and exactly through it: D = c_skip x + c_out F(c_in x) with F blind to sigma
        s = torch.full((6,), 2.0)
        c_skip, c_out, c_in, _ = (v[:, None, None, None] for v in net.precond.scalings(s))
        F = raw_output(net, c_in * x, torch.full((6,), 0.3), label=label)
        torch.testing.assert_close(d2, c_skip * x + c_out * F, rtol=1e-4, atol=1e-5)
        # the noise-embedding hook (time-step guidance) is a no-op too
        torch.testing.assert_close(net(x, s, label=label, noise_embed_offset=torch.full((6,), 3.0)),
                                   net(x, s, label=label))


def test_the_default_network_does_depend_on_sigma(preset):
    """The check above can fail: the same probe on the noise-conditional default network sees sigma."""
    net = build(ImageConfig(**{**vars(preset), "noise_cond": True}))
    x_in = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = raw_output(net, x_in, torch.full((6,), 0.01), label=torch.arange(6))
        b = raw_output(net, x_in, torch.full((6,), 3.0), label=torch.arange(6))
    assert (a - b).abs().max() > 1e-2
