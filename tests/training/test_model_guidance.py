"""Model-guidance training (training.model_guidance): neutral at w = 1, the target as defined, and on a 1-D
two-class world the trained conditional model converges to CFG at weight w of its own unconditional branch."""

import pytest
import torch
from torch import nn

from guidelab.denoisers import EDMPrecond, edm_loss
from guidelab.errors import GuidelabError
from guidelab.training.images import ImageConfig
from guidelab.training.model_guidance import mg_lambda, mg_loss, mg_target

NULL = 2


class Toy1D(nn.Module):
    """D(x; sigma, label) for 1-D x, labels 0, 1 and the null label 2."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Linear(4, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, x, sigma, label):
        h = torch.cat([x, nn.functional.one_hot(label, 3).to(x)], 1)
        return x / (1 + sigma[:, None] ** 2) + self.f(h)


def _batch(n, g):
    label = torch.randint(2, (n,), generator=g)
    x0 = (2.0 * label - 1)[:, None] + 0.5 * torch.randn(n, 1, generator=g)
    sigma = torch.ones(n)
    return x0 + sigma[:, None] * torch.randn(n, 1, generator=g), sigma, x0, label


def test_w1_is_the_edm_loss_bit_for_bit():
    net, pre = Toy1D(), EDMPrecond(0.5)
    x, s, x0, y = _batch(64, torch.Generator().manual_seed(0))
    assert torch.equal(mg_loss(net, x, s, x0, pre, label=y, null_label=NULL, w=1.0), edm_loss(net, x, s, x0, pre, label=y))


def test_target_is_x0_plus_lambda_times_the_model_difference():
    net = Toy1D()
    x, s, x0, y = _batch(64, torch.Generator().manual_seed(0))
    y = torch.where(torch.arange(64) % 5 == 0, NULL, y)
    with torch.no_grad():
        ref = x0 + 0.75 * (net(x, s, label=y) - net(x, s, label=torch.full_like(y, NULL)))
    out = mg_target(net, x, s, x0, y, NULL, w=4.0)
    dropped = y == NULL
    torch.testing.assert_close(out[~dropped], ref[~dropped], rtol=1e-5, atol=1e-6)
    assert torch.equal(out[dropped], x0[dropped])
    assert not out.requires_grad  # stop-gradient
    assert mg_lambda(4.0) == 0.75


def test_config_checks():
    with pytest.raises(GuidelabError, match="mg_w"):
        ImageConfig(mg_w=0.5)
    with pytest.raises(GuidelabError, match="conditional"):
        ImageConfig(mg_w=2.0, conditional=False)
    assert ImageConfig(mg_w=1.0).name() == ImageConfig().name()  # the neutral key keeps old run names
    assert ImageConfig(mg_w=2.0).name() != ImageConfig().name()


def _train(w, steps=500):
    net, pre = Toy1D(), EDMPrecond(0.5)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, s, x0, y = _batch(512, g)
        y = torch.where(torch.rand(512, generator=g) < 0.2, NULL, y)
        loss = mg_loss(net, x, s, x0, pre, label=y, null_label=NULL, w=w).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@pytest.mark.slow  # about 1.5 s on a quiet machine, 7 s on a loaded one
def test_trained_model_is_cfg_at_w_of_its_own_unconditional_branch():
    """Fixed point: D_c = D_u + w (E[x0 | x, c] - D_u); E[x0 | x, c] is exact here (Gaussian class, sigma = 1)."""
    w = 2.0
    net = _train(w)
    x = torch.linspace(-2.5, 2.5, 51)[:, None]
    s = torch.ones(51)
    with torch.no_grad():
        D_u = net(x, s, label=torch.full((51,), NULL))
        for c, mu in ((0, -1.0), (1, 1.0)):
            D_c = net(x, s, label=torch.full((51,), c))
            exact = (0.25 * x + mu) / 1.25  # E[x0 | x, c] for x0 ~ N(mu, 0.5^2), sigma = 1
            err_cfg = (D_c - (D_u + w * (exact - D_u))).abs().mean()
            err_plain = (D_c - exact).abs().mean()
            assert err_cfg < 0.3 * err_plain, (float(err_cfg), float(err_plain))
