"""Guidance zoo II against the official code, re-written here by hand from its published source (never
copied): diffusers' TCFG ``normalized_guidance`` and ``mambo_guidance``, ComfyUI's post-CFG ``CFGNorm`` and
diffusers' (Imagen) ``_threshold_sample``; each equal to guidelab's rule on the same predictions."""

import math

import pytest
import torch

from guidelab import guidance as G
from guidelab.guidance._spaces import to_space
from guidelab.guidance.dynamic_thresholding import threshold

torch.manual_seed(0)
X = torch.randn(4, 3, 4, 4, dtype=torch.float64)
SIG = torch.tensor([0.3, 1.0, 2.5, 8.0], dtype=torch.float64)
A = torch.randn(3, 3, dtype=torch.float64)


class Net:
    """A fixed non-linear image denoiser with a label (2 = null): enough to make both branches differ."""

    condition = G.Condition("label", {"label": 2}, 2)

    def __call__(self, x, sigma, label=None):
        lab = torch.full((x.shape[0],), 2) if label is None else label
        s = sigma.reshape(-1, 1, 1, 1)
        shift = torch.tensor([0.8, -0.5, 0.0], dtype=x.dtype)[lab].reshape(-1, 1, 1, 1)
        return torch.tanh(torch.einsum("ij,bjhw->bihw", A, x) / (1 + s) + shift) * 1.3


NET, LAB = Net(), {"label": torch.tensor([0, 1, 0, 1])}


def _branches(space):
    c, u = NET(X, SIG, **LAB), NET(X, SIG, label=torch.full((4,), 2))
    return to_space(c, X, SIG, space), to_space(u, X, SIG, space)


def _diffusers_tcfg(pred_cond, pred_uncond, scale):
    preds = torch.stack([pred_cond, pred_uncond], dim=1).flatten(2)
    _, _, Vh = torch.linalg.svd(preds, full_matrices=False)
    Vh_mod = Vh.clone()
    Vh_mod[:, 1] = 0
    flat = pred_uncond.reshape(pred_uncond.size(0), 1, -1)
    proj = torch.matmul(torch.matmul(flat, Vh.transpose(-2, -1)), Vh_mod).reshape(pred_uncond.shape)
    return proj + scale * (pred_cond - proj)


def _diffusers_mambo(pred_cond, pred_uncond, scale, alpha):
    dims = list(range(1, pred_cond.ndim))
    diff = pred_cond - pred_uncond
    ratio = torch.linalg.vector_norm(diff, dim=dims, keepdim=True) / torch.linalg.vector_norm(pred_uncond, dim=dims, keepdim=True)
    return pred_uncond + (1.0 + (scale - 1.0) * torch.exp(-alpha * ratio)) * diff


def _comfy_cfg_norm(cond_denoised, denoised):
    scale = (cond_denoised.norm(dim=1, keepdim=True) / (denoised.norm(dim=1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
    return denoised * scale


def _diffusers_threshold(sample, ratio, sample_max_value):
    b = sample.shape[0]
    flat = sample.reshape(b, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=sample_max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(sample.shape)


@pytest.mark.parametrize("w", [2.0, 7.5])
def test_tcfg_equals_diffusers(w):
    e_c, e_u = _branches("eps")
    got = to_space(G.tcfg(G.cfg(NET, w))(X, SIG, **LAB), X, SIG, "eps")
    torch.testing.assert_close(got, _diffusers_tcfg(e_c, e_u, w), rtol=0, atol=1e-10)


@pytest.mark.parametrize("w,alpha", [(5.0, 8.0), (10.0, 1.0)])
def test_mag_equals_diffusers_mambo_guidance(w, alpha):
    v_c, v_u = _branches("flow")
    got = to_space(G.mag(G.cfg(NET, w), alpha=alpha)(X, SIG, **LAB), X, SIG, "flow")
    torch.testing.assert_close(got, _diffusers_mambo(v_c, v_u, w, alpha), rtol=0, atol=1e-10)


def test_cfg_norm_equals_comfyui_post_cfg_node():
    c, u = _branches("x0")
    cfg = u + 6.0 * (c - u)
    got = G.cfg_norm(G.cfg(NET, 6.0))(X, SIG, **LAB)
    torch.testing.assert_close(got, _comfy_cfg_norm(c, cfg), rtol=0, atol=1e-7)  # ComfyUI's + 1e-8
    assert (got != cfg).any() and (got.norm(dim=1) <= c.norm(dim=1) + 1e-12).all()


@pytest.mark.parametrize("s_max", [1.0, 1.5, math.inf])
def test_dynamic_thresholding_equals_diffusers_threshold_sample(s_max):
    D = 2.0 * torch.randn(4, 3, 8, 8, dtype=torch.float64)
    ref = _diffusers_threshold(D, 0.995, s_max)
    torch.testing.assert_close(threshold(D, 0.995, 1.0, None if math.isinf(s_max) else s_max), ref, rtol=0, atol=1e-14)
    c, u = NET(X, SIG, **LAB), NET(X, SIG, label=torch.full((4,), 2))
    got = G.dynamic_thresholding(G.cfg(NET, 4.0), percentile=0.9, s_max=None if math.isinf(s_max) else s_max)(X, SIG, **LAB)
    torch.testing.assert_close(got, _diffusers_threshold(u + 4.0 * (c - u), 0.9, s_max), rtol=0, atol=1e-12)


def test_fdg_is_the_same_in_every_space():
    """diffusers' FDG works in the pipeline's prediction space (eps, flow); guidelab's default is x0. The
    pyramid is linear and each band's weights sum to 1, so the space's x term passes through: equal."""
    ref = G.fdg(G.cfg(NET, 5.0), 1.5, space="x0")(X, SIG, **LAB)
    for space in ("eps", "v", "flow"):
        got = G.fdg(G.cfg(NET, 5.0), 1.5, space=space)(X, SIG, **LAB)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def _comfy_perp_neg(noise_pos, noise_neg, noise_nocond, neg_scale, cond_scale):
    pos, neg = noise_pos - noise_nocond, noise_neg - noise_nocond
    perp = neg - (torch.mul(neg, pos).sum() / torch.norm(pos) ** 2) * pos  # sums over the whole batch
    return noise_nocond + cond_scale * (pos - perp * neg_scale)


@pytest.mark.parametrize("neg_w", [0.5, 1.5])
def test_perp_neg_equals_comfyui_per_sample(neg_w):
    """ComfyUI's ``perp_neg`` (eps space) on batches of one: guidelab's per-sample Perp-Neg, to 1e-10
    (ComfyUI's dot products run over its whole batch; guidelab's per sample, batch-invariant)."""
    got = to_space(G.perp_neg(G.cfg(NET, 4.0), {"label": torch.tensor([1, 0, 1, 0])}, neg_w)(X, SIG, **LAB), X, SIG, "eps")
    e = {
        k: to_space(NET(X, SIG, label=torch.tensor(v)), X, SIG, "eps")
        for k, v in (("pos", [0, 1, 0, 1]), ("neg", [1, 0, 1, 0]), ("null", [2, 2, 2, 2]))
    }
    ref = torch.cat(
        [_comfy_perp_neg(e["pos"][i : i + 1], e["neg"][i : i + 1], e["null"][i : i + 1], neg_w, 4.0) for i in range(4)]
    )
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
