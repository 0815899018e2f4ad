import pytest
import torch

from guidelab.denoisers import edm_loss
from guidelab.errors import GuidelabError
from guidelab.guidance import cfg
from guidelab.models import PixelMLP, UNet, build, config
from guidelab.training import load_model, save_model

SMALL = dict(hidden=32, depth=2, emb=16)
MODELS = [(PixelMLP, SMALL), (UNet, dict(hidden=8, depth=1, emb=16))]
both = pytest.mark.parametrize("cls, small", MODELS, ids=["PixelMLP", "UNet"])


def _trained_like(seed=0, cls=PixelMLP, small=SMALL, **kw):
    torch.manual_seed(seed)
    m = cls(**{**small, **kw}).eval()
    with torch.no_grad():  # output layers are zero at init; make the network do something
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
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


@both
def test_config_round_trip_and_checkpoint(tmp_path, cls, small):
    m = _trained_like(cls=cls, small=small, num_classes=3, extra_scalar="w", noise_cond=False)
    cfg_ = config(m)
    assert cfg_["name"] == cls.__name__ and build(cfg_).config() == m.config()
    save_model(tmp_path / "m.safetensors", m)
    m2 = load_model(tmp_path / "m.safetensors")
    x, sigma = _inputs()
    with torch.no_grad():
        assert torch.equal(m2(x, sigma, label=1, w=2.0), m(x, sigma, label=1, w=2.0))


@both
def test_labels_null_and_cfg(cls, small):
    m = _trained_like(cls=cls, small=small, num_classes=3)
    x, sigma = _inputs()
    with torch.no_grad():
        assert torch.equal(m(x, sigma), m(x, sigma, label=3))  # None is the null label
        assert not torch.allclose(m(x, sigma, label=0), m(x, sigma, label=3))
        guided = cfg(m, w=1.0)
        torch.testing.assert_close(guided(x, sigma, label=torch.zeros(6, dtype=torch.long)), m(x, sigma, label=0))
    with pytest.raises(GuidelabError, match=r"labels must lie in \[0, 3\]"):
        m(x, sigma, label=4)
    with pytest.raises(GuidelabError, match="unconditional"):
        _trained_like(cls=cls, small=small)(x, sigma, label=0)


@both
def test_declares_condition_and_noise_embedding_to_guiders(cls, small):
    """``condition`` and ``noise_embed_dim`` (read by cfg / icg / tsg) match what the network accepts."""
    m = _trained_like(cls=cls, small=small, num_classes=3)
    assert (m.condition.key, dict(m.condition.null), m.condition.num_classes) == ("label", {"label": 3}, 3)
    assert _trained_like(cls=cls, small=small).condition is None
    assert m.noise_embed_dim == 16 and _trained_like(cls=cls, small=small, noise_cond=False).noise_embed_dim is None
    x, sigma = _inputs()
    with torch.no_grad():
        assert torch.equal(m(x, sigma, **m.condition.null), m(x, sigma))
        off = torch.ones(6, m.noise_embed_dim)
        assert not torch.equal(m(x, sigma, label=1, noise_embed_offset=off), m(x, sigma, label=1))


@both
def test_noise_unconditional_network_ignores_sigma(cls, small):
    x, _ = _inputs()
    a, b = torch.full((6,), 0.1), torch.full((6,), 5.0)
    for noise_cond in (True, False):
        m = _trained_like(cls=cls, small=small, noise_cond=noise_cond, num_classes=2)
        with torch.no_grad():
            Fa = m._F(x, m.precond.scalings(a)[3], 1, None, {})
            Fb = m._F(x, m.precond.scalings(b)[3], 1, None, {})
            off = m._F(x, m.precond.scalings(a)[3], 1, torch.full((6,), 0.5), {})
        assert torch.equal(Fa, Fb) == (not noise_cond)
        assert torch.equal(Fa, off) == (not noise_cond)  # the TSG offset only acts on the noise input


@both
def test_vector_noise_embed_offset(cls, small):
    """TSG's vector form: a [batch, emb] offset moves the noise embedding only; zero is a no-op."""
    from guidelab.guidance import tsg

    m = _trained_like(cls=cls, small=small, num_classes=2)
    x, sigma = _inputs()
    e = m.emb_layer.in_features - 3  # Fourier(emb) of c_noise + one-hot of 2 classes + null
    with torch.no_grad():
        base = m(x, sigma, label=1)
        assert torch.equal(m(x, sigma, label=1, noise_embed_offset=torch.zeros(6, e)), base)
        off = torch.zeros(6, e)
        off[3] = 0.5  # only row 3 perturbed
        out = m(x, sigma, label=1, noise_embed_offset=off)
        assert torch.equal(out[:3], base[:3]) and not torch.equal(out[3], base[3])
        assert torch.equal(tsg(m, 1.0, dim=e, seeds=range(6))(x, sigma, label=1), base)  # w = 1: no guidance
        assert not torch.equal(tsg(m, 2.0, dim=e, seeds=range(6))(x, sigma, label=1), base)
    with pytest.raises(GuidelabError, match=r"noise_embed_offset must be \[batch\] or \[batch, "):
        m(x, sigma, label=1, noise_embed_offset=torch.zeros(6, e + 1))


@both
def test_extra_scalar_is_an_input(cls, small):
    m = _trained_like(cls=cls, small=small, extra_scalar="beta")
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
        cls(extra_scalar="label")


@both
def test_batch_rows_independent(cls, small):
    m = _trained_like(cls=cls, small=small, num_classes=3, extra_scalar="w")
    x, sigma = _inputs()
    label, w = torch.tensor([0, 1, 2, 3, 0, 1]), torch.linspace(1, 3, 6)
    with torch.no_grad():
        full = m(x, sigma, label=label, w=w)
        part = m(x[2:4], sigma[2:4], label=label[2:4], w=w[2:4])
    torch.testing.assert_close(full[2:4], part, rtol=1e-4, atol=1e-5)  # GEMM rounding only


def test_unet_shapes_levels_and_attention():
    m = UNet(
        img_channels=3,
        img_resolution=16,
        hidden=8,
        depth=2,
        channel_mult=(1, 2, 2),
        attn_resolutions=(8, 4),
        emb=16,
        num_classes=4,
    )
    x, sigma = _inputs(n=3, c=3, r=16)
    assert m(x, sigma, label=torch.tensor([0, 4, 2])).shape == x.shape
    assert sum(b.attn is not None for b in m.modules() if hasattr(b, "attn")) > 0
    assert build(config(m)).config() == m.config()
    with pytest.raises(GuidelabError, match="divisible"):
        UNet(img_resolution=6, channel_mult=(1, 2, 2))


def test_unet_few_training_steps_fit_a_batch():
    torch.manual_seed(0)
    m = UNet(hidden=8, depth=1, emb=16, num_classes=10).train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
    label = torch.arange(16) % 11
    sigma = torch.exp(torch.randn(16, generator=g) - 1)
    x = x0 + sigma[:, None, None, None] * torch.randn(16, 1, 8, 8, generator=g)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = edm_loss(m, x, sigma, x0, m.precond, label=label).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
