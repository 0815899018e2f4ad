import pytest
import torch

from guidelab.errors import GuidelabError
from guidelab.guidance import cfg
from guidelab.models import PixelMLP, build, config
from guidelab.training import load_model, save_model

SMALL = dict(hidden=32, depth=2, emb=16)


def _trained_like(seed=0, **kw):
    torch.manual_seed(seed)
    m = PixelMLP(**{**SMALL, **kw}).eval()
    with torch.no_grad():  # the output layer is zero at init; make the network do something
        m.out.weight.normal_(0, 0.3)
    return m


def _inputs(n=6, c=1, r=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, r, r, generator=g), torch.rand(n, generator=g) * 3 + 0.05


def test_untrained_is_c_skip_x_and_shapes():
    m = PixelMLP(img_channels=3, img_resolution=4, num_classes=5, **SMALL)
    x, sigma = _inputs(c=3, r=4)
    d = m(x, sigma, label=torch.arange(6) % 6)
    assert d.shape == x.shape
    torch.testing.assert_close(d, 0.25 / (0.25 + sigma[:, None, None, None] ** 2) * x)
    with pytest.raises(GuidelabError, match=r"shape \[batch, 3, 4, 4\]"):
        m(torch.zeros(2, 1, 4, 4), 1.0)


def test_config_round_trip_and_checkpoint(tmp_path):
    m = _trained_like(num_classes=3, extra_scalar="w", noise_cond=False)
    cfg_ = config(m)
    assert cfg_["name"] == "PixelMLP" and build(cfg_).config() == m.config()
    save_model(tmp_path / "m.safetensors", m)
    m2 = load_model(tmp_path / "m.safetensors")
    x, sigma = _inputs()
    with torch.no_grad():
        assert torch.equal(m2(x, sigma, label=1, w=2.0), m(x, sigma, label=1, w=2.0))


def test_labels_null_and_cfg():
    m = _trained_like(num_classes=3)
    x, sigma = _inputs()
    with torch.no_grad():
        assert torch.equal(m(x, sigma), m(x, sigma, label=3))  # None is the null label
        assert not torch.allclose(m(x, sigma, label=0), m(x, sigma, label=3))
        guided = cfg(m, w=1.0)
        torch.testing.assert_close(guided(x, sigma, label=torch.zeros(6, dtype=torch.long)), m(x, sigma, label=0))
    with pytest.raises(GuidelabError, match=r"labels must lie in \[0, 3\]"):
        m(x, sigma, label=4)
    with pytest.raises(GuidelabError, match="unconditional"):
        _trained_like()(x, sigma, label=0)


def test_noise_unconditional_network_ignores_sigma():
    x, _ = _inputs()
    a, b = torch.full((6,), 0.1), torch.full((6,), 5.0)
    for noise_cond in (True, False):
        m = _trained_like(noise_cond=noise_cond, num_classes=2)
        with torch.no_grad():
            Fa = m._F(x, m.precond.scalings(a)[3], 1, None, {})
            Fb = m._F(x, m.precond.scalings(b)[3], 1, None, {})
            off = m._F(x, m.precond.scalings(a)[3], 1, torch.full((6,), 0.5), {})
        assert torch.equal(Fa, Fb) == (not noise_cond)
        assert torch.equal(Fa, off) == (not noise_cond)  # the TSG offset only acts on the noise input


def test_extra_scalar_is_an_input():
    m = _trained_like(extra_scalar="beta")
    x, sigma = _inputs()
    with torch.no_grad():
        y1, y2 = m(x, sigma, beta=0.5), m(x, sigma, beta=torch.full((6,), 0.9))
        assert y1.shape == x.shape and not torch.allclose(y1, y2)
        assert torch.equal(m(x, sigma, beta=0.5), m(x, sigma, beta=torch.full((6,), 0.5)))
    with pytest.raises(GuidelabError, match="needs the scalar beta"):
        m(x, sigma)
    with pytest.raises(GuidelabError, match="unknown conditioning"):
        m(x, sigma, beta=1.0, w=2.0)
    with pytest.raises(GuidelabError, match="extra_scalar"):
        PixelMLP(extra_scalar="label")


def test_batch_rows_independent():
    m = _trained_like(num_classes=3, extra_scalar="w")
    x, sigma = _inputs()
    label, w = torch.tensor([0, 1, 2, 3, 0, 1]), torch.linspace(1, 3, 6)
    with torch.no_grad():
        full = m(x, sigma, label=label, w=w)
        part = m(x[2:4], sigma[2:4], label=label[2:4], w=w[2:4])
    torch.testing.assert_close(full[2:4], part, rtol=1e-5, atol=1e-6)
