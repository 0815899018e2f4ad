import pytest
import torch

from guidelab.denoisers import EDMPrecond
from guidelab.errors import GuidelabError
from guidelab.guidance import cfg
from guidelab.models import ToyMLP, build, config


def _model(seed=0, gain=0.8, **kw):
    torch.manual_seed(seed)
    m = ToyMLP(**kw).double().eval()
    with torch.no_grad():
        m.gain.fill_(gain)  # gain = 0 at init makes every model a Gaussian; make it do something
    return m


def _inputs(n=9, dim=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64) + 0.02


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(output="denoiser"),
        dict(num_classes=3),
        dict(noise_cond=False),
        dict(dim=3, hidden=16, depth=2, output="denoiser", num_classes=2),
    ],
)
def test_shapes(kw):
    m = ToyMLP(**kw)
    x = torch.randn(5, m.dim)
    assert m(x, torch.full((5,), 0.3)).shape == (5, m.dim)
    assert m(x, 0.3).shape == (5, m.dim)  # a scalar sigma is broadcast
    assert m.score(x, 0.3).shape == (5, m.dim)


def test_energy_denoiser_is_tweedie_of_its_log_density():
    m = _model(num_classes=2)
    x, sigma = _inputs()
    label = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(m.logp(xr, sigma, label).sum(), xr)
    torch.testing.assert_close(m.score(x, sigma, label), grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x, sigma, label), x + sigma[:, None] ** 2 * grad, rtol=1e-12, atol=1e-12)


def test_energy_parameter_gradients_match_double_backward():
    # The explicit score is differentiated with a first-order backward; it must give the gradients
    # that autograd's double backward through logp gives.
    m = _model().requires_grad_(True)
    x, sigma = _inputs()
    target = torch.randn_like(x)

    def grads(score):
        m.zero_grad()
        (sigma**2 * (score - target).square().mean(1)).mean().backward()
        return [p.grad.clone() for p in m.parameters()]

    xr = x.clone().requires_grad_(True)
    auto = torch.autograd.grad(m.logp(xr, sigma).sum(), xr, create_graph=True)[0]
    for a, b in zip(grads(m.score(x, sigma)), grads(auto)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_untrained_models_are_the_gaussian_denoiser():
    # gain = 0 at init: log p = -|x|^2 / (2 (sd^2 + sigma^2)), so D = x sd^2 / (sd^2 + sigma^2) = c_skip x.
    x, sigma = _inputs()
    expect = x * 0.25 / (0.25 + sigma[:, None] ** 2)
    for output in ("energy", "denoiser"):
        m = ToyMLP(output=output).double()
        torch.testing.assert_close(m(x, sigma), expect, rtol=1e-12, atol=1e-12)


def test_denoiser_uses_edm_preconditioning():
    m = _model(output="denoiser")
    x, sigma = _inputs()
    c_skip, c_out, c_in, c_noise = EDMPrecond(0.5).scalings(sigma)
    F = m.gain * m.out(torch.nn.functional.silu(m.trunk(c_in[:, None] * x, c_noise)) / 0.596)
    torch.testing.assert_close(m(x, sigma), c_skip[:, None] * x + c_out[:, None] * F)


@pytest.mark.parametrize("output", ["energy", "denoiser"])
def test_noise_unconditional_network_ignores_sigma(output):
    # Same network input x_in = c_in x at two noise levels: the network's output is the same, so
    # only the preconditioning (x_in scaling, c_skip/c_out, the energy's 1/sigma) depends on sigma.
    m = _model(output=output, noise_cond=False)
    x_in, _ = _inputs()
    s1, s2 = torch.full((9,), 0.1, dtype=torch.float64), torch.full((9,), 0.7, dtype=torch.float64)
    assert torch.equal(m.trunk(x_in, s1.log() / 4), m.trunk(x_in, s2.log() / 4))
    m2 = _model(output=output, noise_cond=True)
    assert not torch.allclose(m2.trunk(x_in, s1.log() / 4), m2.trunk(x_in, s2.log() / 4))


def test_conditional_null_label_and_cfg():
    m = _model(num_classes=3, output="denoiser")
    assert m.null_label == 3 and ToyMLP().null_label is None
    x, sigma = _inputs()
    lab = torch.full((9,), 1)
    null = m(x, sigma, torch.full((9,), 3))
    assert torch.equal(m(x, sigma), null)  # label=None means null
    assert torch.equal(m(x, sigma, 3), null)  # a scalar label is broadcast
    D = m(x, sigma, lab)
    assert not torch.allclose(D, null)
    assert not torch.allclose(D, m(x, sigma, torch.full((9,), 0)))
    torch.testing.assert_close(cfg(m, 2.5)(x, sigma, label=lab), null + 2.5 * (D - null))


def test_declares_condition_and_noise_embedding_to_guiders():
    """``condition`` (label key, null override, classes) and ``noise_embed_dim``: what cfg / icg / tsg read."""
    m = _model(num_classes=3, hidden=16)
    assert (m.condition.key, dict(m.condition.null), m.condition.num_classes) == ("label", {"label": 3}, 3)
    assert ToyMLP().condition is None
    assert m.noise_embed_dim == 16 and ToyMLP(noise_cond=False).noise_embed_dim is None
    x, sigma = _inputs()
    lab = torch.full((9,), 1)
    # the declared null is the network's null label, and the vector offset of that size is accepted
    assert torch.equal(m(x, sigma, **m.condition.null), m(x, sigma))
    assert not torch.equal(m(x, sigma, lab, noise_embed_offset=torch.ones(9, m.noise_embed_dim)), m(x, sigma, lab))


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, s: m(x, s, torch.full((9,), 4)),  # out of range
        lambda m, x, s: m(x, s, torch.full((9,), 0.5)),  # not integer
        lambda m, x, s: m(x, s, torch.zeros(3, dtype=torch.long)),
        lambda m, x, s: ToyMLP().double()(x, s, torch.zeros(9, dtype=torch.long)),  # unconditional
        lambda m, x, s: m(x[:, :1], s),
        lambda m, x, s: m(x, -s),
        lambda m, x, s: ToyMLP(output="eps"),
        lambda m, x, s: ToyMLP(hidden=0),
    ],
)
def test_bad_input_is_one_clear_line(call):
    m = _model(num_classes=3)
    x, s = _inputs()
    with pytest.raises(GuidelabError) as e:
        call(m, x, s)
    assert "\n" not in str(e.value)


def test_energy_model_works_without_autograd():
    m = _model().float().requires_grad_(False)
    x, sigma = (t.float() for t in _inputs())
    ref = m(x, sigma)
    with torch.no_grad():
        a = m(x, sigma)
    with torch.inference_mode():
        b = m(x, sigma)
    assert torch.equal(a, ref) and torch.equal(b, ref) and not a.requires_grad


def test_forced_weight_normalisation_only_while_training():
    m = ToyMLP()
    w0 = m.layers[1].weight.detach().clone()
    m.eval()(torch.zeros(2, 2), 0.5)
    assert torch.equal(m.layers[1].weight, w0)
    m.train()(torch.zeros(2, 2), 0.5)
    rms = m.layers[1].weight.square().mean(1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=0)


def test_config_round_trip():
    m = _model(hidden=16, depth=2, num_classes=2, output="denoiser", noise_cond=False)
    cfg_ = config(m)
    assert cfg_["name"] == "ToyMLP" and cfg_["hidden"] == 16 and cfg_["noise_cond"] is False
    m2 = build(cfg_).double().eval()
    assert config(m2) == cfg_
    m2.load_state_dict(m.state_dict())
    x, sigma = _inputs()
    assert torch.equal(m2(x, sigma), m(x, sigma))


@pytest.mark.parametrize("bad", [{"name": "Nope"}, {"name": "ToyMLP", "width": 3}, {"hidden": 3}, "ToyMLP"])
def test_build_rejects_bad_configs(bad):
    with pytest.raises(GuidelabError) as e:
        build(bad)
    assert "\n" not in str(e.value)
