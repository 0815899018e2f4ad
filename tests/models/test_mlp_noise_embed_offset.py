"""The TSG hook of ToyMLP: ``noise_embed_offset`` moves c_noise only, never the preconditioning."""

import pytest
import torch

from guidelab import guidance as G
from guidelab.errors import GuidelabError
from guidelab.models import ToyMLP
from guidelab.models.mlp import mp_silu


@pytest.mark.parametrize("output", ["denoiser", "energy"])
def test_offset_reaches_only_the_noise_embedding(output):
    torch.manual_seed(0)
    net = ToyMLP(hidden=16, depth=2, output=output).double().eval()  # eval: no in-place weight normalisation
    with torch.no_grad():
        net.gain.fill_(1.0)  # gain 0 at init would hide the trunk
    x = torch.randn(6, 2, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    delta = torch.linspace(-0.3, 0.3, 6, dtype=torch.float64)
    assert torch.equal(net(x, sigma, noise_embed_offset=torch.zeros(6, dtype=torch.float64)), net(x, sigma))
    out = net(x, sigma, noise_embed_offset=delta)
    c_skip, c_out, c_in, c_noise = net.precond.scalings(sigma)
    if output == "denoiser":  # D = c_skip x + c_out F(c_in x; c_noise + delta)
        ref = c_skip[:, None] * x + c_out[:, None] * net._F(c_in[:, None] * x, c_noise + delta)
    else:  # logp(x; sigma) with the trunk at c_noise + delta
        xg = x.clone().requires_grad_(True)
        x_in = xg / (net.sigma_data**2 + sigma**2).sqrt()[:, None]
        y = net.trunk(x_in, c_noise + delta)
        logp = net.gain * y.square().mean(1) / sigma - 0.5 * x_in.square().sum(1)
        (score,) = torch.autograd.grad(logp.sum(), xg)
        ref = x + sigma[:, None] ** 2 * score
        torch.testing.assert_close(net.logp(x, sigma, noise_embed_offset=delta), logp.detach())
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-10)
    # TSG on ToyMLP: both branches in one batched call, w = 1 bit-identical
    calls = []
    fwd = net.forward
    net.forward = lambda *a, **k: calls.append(a[0].shape[0]) or fwd(*a, **k)
    G.tsg(net, 2.0, s=0.5)(x, sigma)
    assert calls == [12]
    assert torch.equal(G.tsg(net, 1.0)(x, sigma), fwd(x, sigma))


@pytest.mark.parametrize("output", ["denoiser", "energy"])
def test_vector_offset_moves_the_noise_embedding_vector(output):
    """A [batch, hidden] offset is added to the first layer's output (the image of c_noise), nothing else."""
    torch.manual_seed(1)
    net = ToyMLP(hidden=8, depth=2, output=output).double().eval()
    with torch.no_grad():
        net.gain.fill_(1.0)
    x = torch.randn(5, 2, dtype=torch.float64)
    sigma = torch.tensor([0.02, 0.2, 0.7, 1.5, 4.0], dtype=torch.float64)
    e = 0.3 * torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(net(x, sigma, noise_embed_offset=torch.zeros(5, 8, dtype=torch.float64)), net(x, sigma))
    c_skip, c_out, c_in, c_noise = net.precond.scalings(sigma)
    xg = x.clone().requires_grad_(True)
    x_in = xg / (net.sigma_data**2 + sigma**2).sqrt()[:, None]
    y = net.layers[0](net._features(x_in, c_noise)) + e  # written out: layer 0, + e, the rest
    for layer in net.layers[1:]:
        y = layer(mp_silu(y))
    if output == "denoiser":
        ref = c_skip[:, None] * x + c_out[:, None] * net.gain * net.out(mp_silu(y))
    else:  # explicit backward == autograd
        logp = net.gain * y.square().mean(1) / sigma - 0.5 * x_in.square().sum(1)
        (score,) = torch.autograd.grad(logp.sum(), xg)
        ref = x + sigma[:, None] ** 2 * score
        torch.testing.assert_close(net.logp(x, sigma, noise_embed_offset=e), logp.detach())
    torch.testing.assert_close(net(x, sigma, noise_embed_offset=e), ref.detach(), rtol=1e-10, atol=1e-10)
    with pytest.raises(GuidelabError, match="noise_embed_offset"):
        net(x, sigma, noise_embed_offset=torch.zeros(5, 3, dtype=torch.float64))
