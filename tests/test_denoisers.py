import pytest
import torch

from guidelab import denoisers as dn
from guidelab.errors import GuidelabError


def _x_sigma(B=16, D=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 2
    sigma = torch.rand(B, generator=g, dtype=torch.float64) * 5 + 0.01
    return x, sigma


def _truth(x, sigma):  # any smooth "x0 estimate"
    return torch.tanh(x) * (1 + sigma[:, None]) ** -1


def test_score_eps_v_round_trips():
    x, sigma = _x_sigma()
    D = _truth(x, sigma)
    s, e, v = dn.to_score(D, x, sigma), dn.to_eps(D, x, sigma), dn.to_v(D, x, sigma)
    torch.testing.assert_close(dn.from_score(lambda x, sigma: s)(x, sigma), D)
    torch.testing.assert_close(dn.from_eps(lambda x, sigma: e)(x, sigma), D)
    torch.testing.assert_close(dn.from_v(lambda x_in, sigma: v)(x, sigma), D)
    for sd in (0.5, 2.0):
        v2 = dn.to_v(D, x, sigma, sigma_data=sd)
        torch.testing.assert_close(dn.from_v(lambda x_in, sigma: v2, sigma_data=sd)(x, sigma), D)


def test_v_prediction_matches_vp_definition():
    # VP: z = alpha x0 + s eps with alpha = 1/sqrt(1+sigma^2), s = sigma/sqrt(1+sigma^2); v = alpha eps - s x0.
    x, sigma = _x_sigma(seed=1)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(x.shape, generator=g, dtype=x.dtype), torch.randn(x.shape, generator=g, dtype=x.dtype)
    alpha, s = (1 / (1 + sigma**2).sqrt())[:, None], (sigma / (1 + sigma**2).sqrt())[:, None]
    z = alpha * x0 + s * eps
    x_edm = z / alpha
    v = alpha * eps - s * x0
    seen = {}

    def v_model(x_in, sig):
        seen["x_in"] = x_in
        return v

    torch.testing.assert_close(dn.from_v(v_model)(x_edm, sigma), x0)
    torch.testing.assert_close(seen["x_in"], z)  # the model sees the VP-scaled input


def test_eps_model_vp_input():
    x, sigma = _x_sigma(seed=3)
    seen = {}

    def eps_model(x_in, sig):
        seen["x_in"] = x_in
        return torch.zeros_like(x_in)

    torch.testing.assert_close(dn.from_eps(eps_model, vp_input=True)(x, sigma), x)
    torch.testing.assert_close(seen["x_in"], x / (1 + sigma[:, None] ** 2).sqrt())


def test_edm_precond_scalings():
    pre = dn.EDMPrecond(sigma_data=0.5)
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = pre.scalings(sigma)
    # Table 1 of EDM, and the identity c_skip^2 sd^2 ... : unit-variance input, and c_skip + c_out^2/sd^2 = 1.
    torch.testing.assert_close(c_in**2 * (sigma**2 + 0.25), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(c_skip + c_out**2 / 0.25, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    torch.testing.assert_close(pre.loss_weight(sigma), 1 / c_out**2)


def test_edm_precond_forward_and_loss_share_scalings():
    pre = dn.EDMPrecond(sigma_data=0.5)
    x, sigma = _x_sigma(seed=4)
    F = lambda x_in, c_noise: torch.sin(x_in) + c_noise[:, None]  # noqa: E731
    D = pre.denoise(F, x, sigma)
    c_skip, c_out, c_in, c_noise = pre.scalings(sigma)
    torch.testing.assert_close(D, c_skip[:, None] * x + c_out[:, None] * F(c_in[:, None] * x, c_noise))
    # The EDM loss equals the unit-weighted error of F against its effective target (EDM eq. 8).
    x0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    xn = x0 + sigma[:, None] * x
    loss = dn.edm_loss(lambda x, s: pre.denoise(F, x, s), xn, sigma, x0, pre)
    F_target = (x0 - c_skip[:, None] * xn) / c_out[:, None]
    torch.testing.assert_close(loss, ((F(c_in[:, None] * xn, c_noise) - F_target) ** 2).mean(1))


def test_edm_loss_checks_shapes():
    pre = dn.EDMPrecond()
    with pytest.raises(GuidelabError):
        dn.edm_loss(lambda x, s: x, torch.zeros(4, 2), torch.ones(3), torch.zeros(4, 2), pre)
    with pytest.raises(GuidelabError):
        dn.edm_loss(lambda x, s: x, torch.zeros(4, 2), torch.ones(4), torch.zeros(4, 3), pre)
