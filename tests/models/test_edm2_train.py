"""EDM2 as a `guidelab train` model: the EDM2 loss (learned uncertainty weighting) on digits."""

import torch

from guidelab.models import edm2
from guidelab.training import load_model
from guidelab.training.images import ImageConfig, image_draw, image_loss, load_data, model_config, train_images

CFG = ImageConfig(model="EDM2", hidden=8, depth=1, emb=8, batch=8, iters=4, snapshot_every=2, lr=1e-2)


def test_edm2_loss_is_uncertainty_weighted():
    data = load_data(CFG)
    from guidelab.models import build

    net = build(model_config(CFG, data))
    assert isinstance(net, edm2.EDM2) and net.label_dim == 10 and net.img_resolution == 8
    with torch.no_grad():
        net.logvar_linear.weight.fill_(1.0)  # u(sigma) != 0, so the weighting shows
        net.unet.out_gain.fill_(0.7)
    got = image_loss(CFG, data)(net, 8, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # the same draws, by hand (EDM2 eq. 21)
    x0, labels = image_draw(data)(8, gen)
    sigma = (torch.randn(8, generator=gen) * CFG.P_std + CFG.P_mean).exp()
    n = torch.randn(x0.shape, generator=gen)
    y = torch.where(torch.rand(8, generator=gen) < CFG.label_dropout, 10, labels)
    err = (net(x0 + sigma[:, None, None, None] * n, sigma, class_labels=y) - x0).square().flatten(1).mean(1)
    u = net.logvar(sigma)
    want = (sigma**2 + 0.25) / (sigma * 0.5) ** 2 / u.exp() * err + u
    torch.testing.assert_close(got, want)
    assert not torch.allclose(u, torch.zeros(8))


def test_train_edm2_on_digits(tmp_path):
    final = train_images(tmp_path, CFG, progress=False, plot=False, threads=1)
    net = load_model(final)
    assert isinstance(net, edm2.EDM2) and net.checkpoint_info["meta"]["model"] == "EDM2"
    assert net.unet.out_gain != 0  # zero at init: the U-Net was trained
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 2.0])
    assert net(x, sigma, class_labels=torch.tensor([3, 10])).shape == x.shape and net.logvar(sigma).shape == (2,)
