"""SAG (self-attention guidance) on a tiny diffusers UNet: one step equals diffusers' StableDiffusionSAGPipeline
step written with its own pieces (its CrossAttnStoreProcessor on the middle block's attn1, ``sag_masking``,
``pred_x0`` / ``pred_epsilon`` and ``gaussian_blur_2d``), with and without CFG; w = 1 bit-identical; misuse refused."""

import importlib
import types

import pytest
import torch

pytest.importorskip("diffusers")
import test_diffusers as base  # tests/integrations is on sys.path (rootdir imports)
from diffusers import DDIMScheduler

from guidelab.app.diffusers_generate import generate
from guidelab.errors import GuidelabError
from guidelab.guidance import registry
from guidelab.integrations import diffusers as gd

sagmod = importlib.import_module("guidelab.integrations.diffusers.sag")  # the module (the package exports sag())

B, C, H = base.B, base.C, base.H
SD_SAG = "diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag"


def _model(tmp_path):
    g = torch.Generator().manual_seed(3)
    null = torch.randn(1, 4, 16, generator=g, dtype=torch.float64)
    folder = base._save(tmp_path, "text_unet")
    den = gd.load(folder, dtype=torch.float64, null_text=null)
    return folder, den, torch.randn(B, 4, 16, generator=g, dtype=torch.float64), null


def _pipeline_step(den, x_vp, t, emb, null, sag_scale, guidance_scale=None):
    """The denoising step's noise prediction of StableDiffusionSAGPipeline.__call__ (its lines, its helpers)."""
    mod = pytest.importorskip(SD_SAG)
    unet = den.model
    pipe = types.SimpleNamespace(unet=unet, scheduler=DDIMScheduler.from_config(den.config))
    P = mod.StableDiffusionSAGPipeline
    attn1 = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    saved, store = attn1.processor, mod.CrossAttnStoreProcessor()
    attn1.processor = store
    map_size = None

    def get_map_size(module, input, output):
        nonlocal map_size
        map_size = output[0].shape[-2:]

    tt = torch.tensor(t)
    with unet.mid_block.attentions[0].register_forward_hook(get_map_size):
        if guidance_scale is None:
            eps = unet(x_vp, tt, encoder_hidden_states=emb).sample
            pred_x0 = P.pred_x0(pipe, x_vp, eps, tt)
            degraded = P.sag_masking(pipe, pred_x0, store.attention_probs, map_size, tt, P.pred_epsilon(pipe, x_vp, eps, tt))
            out = eps + sag_scale * (eps - unet(degraded, tt, encoder_hidden_states=emb).sample)
        else:
            both = unet(torch.cat([x_vp] * 2), tt, encoder_hidden_states=torch.cat([null.expand(B, -1, -1), emb])).sample
            eps_u, eps_c = both.chunk(2)
            out = eps_u + guidance_scale * (eps_c - eps_u)
            pred_x0 = P.pred_x0(pipe, x_vp, eps_u, tt)
            uncond_attn, _ = store.attention_probs.chunk(2)
            degraded = P.sag_masking(pipe, pred_x0, uncond_attn, map_size, tt, P.pred_epsilon(pipe, x_vp, eps_u, tt))
            out = out + sag_scale * (eps_u - unet(degraded, tt, encoder_hidden_states=null.expand(B, -1, -1)).sample)
    attn1.processor = saved
    return out


@pytest.mark.parametrize("cfg", [None, 3.0])
@pytest.mark.parametrize("t", [300, 800])
def test_sag_equals_the_pipeline_step(tmp_path, cfg, t):
    """D = x - sigma eps~ with eps~ the pipeline's SAG (and CFG) noise prediction, at sag_scale 0.75 (w = 1.75) and
    1.5 (float64 model; a flipped mask bit would show as a difference ~1e-1); the mask is neither empty nor full,
    and SAG changes the result."""
    _, den, emb, null = _model(tmp_path)
    sigma = den.grid[[t, t]]
    s = sigma.view(-1, 1, 1, 1)
    x = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (1 + s**2).sqrt()
    with torch.no_grad():
        for sag_scale in (0.75, 1.5):
            ours = sagmod.sag(den, 1 + sag_scale, cfg_weight=cfg)(x, sigma, encoder_hidden_states=emb)
            ref = x - s * _pipeline_step(den, x / (1 + s**2).sqrt(), t, emb, null, sag_scale, cfg)
            # relative 1e-7: the pipeline's pred_x0 / pred_epsilon take sqrt(alpha_bar) of a float32 scalar (~3e-8)
            assert (ours - ref).abs().max() < 1e-7 * ref.abs().max(), sag_scale
        plain = den(x, sigma, encoder_hidden_states=emb)
        store: list = []
        with gd.perturbed_attention(den.model, gd.Perturbation("sag"), torch.ones(B, dtype=torch.bool), store=store):
            den(x, sigma, encoder_hidden_states=emb)
    received = store[0][1]
    assert 0 < (received > 1).sum() < received.numel()
    assert (ours - plain).abs().max() > 1e-3


def test_sag_blur_is_the_pipelines_blur():
    mod = pytest.importorskip(SD_SAG)
    img = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(sagmod.gaussian_blur(img), mod.gaussian_blur_2d(img, 9, 1.0))
    assert torch.equal(sagmod.gaussian_blur(img, 5, 0.7), mod.gaussian_blur_2d(img, 5, 0.7))


def test_sag_neutral_calls_and_errors(tmp_path):
    """w = 1 is the plain model bit for bit (one call); w != 1 is two calls of B rows (the second needs the first's
    map), with CFG 2B then B rows; the registry and generate build it; non-UNet models, several mask layers, an even
    kernel and a tensor w are one-line errors."""
    folder, den, emb, null = _model(tmp_path)
    x = torch.randn(B, C, H, H, dtype=torch.float64) * 3
    sigma = torch.full((B,), 2.0, dtype=torch.float64)
    calls = base._count_calls(den.model)
    with torch.no_grad():
        plain = den(x, sigma, encoder_hidden_states=emb)
        calls.clear()
        assert torch.equal(sagmod.sag(den, 1.0)(x, sigma, encoder_hidden_states=emb), plain)
        assert calls == [B]
        calls.clear()
        sagmod.sag(den, 2.0)(x, sigma, encoder_hidden_states=emb)
        assert calls == [B, B]
        calls.clear()
        sagmod.sag(den, 2.0, cfg_weight=3.0)(x, sigma, encoder_hidden_states=emb)
        assert calls == [2 * B, B]
        g = registry.build("sag", registry.Context(den, w=1.75, options=["blur_sigma=1.0", "cfg_weight=2.0"]))
        want = sagmod.sag(den, 1.75, cfg_weight=2.0)(x, sigma, encoder_hidden_states=emb)
        assert torch.equal(g(x, sigma, encoder_hidden_states=emb), want)
    kw = dict(prompt_embeds=emb[:1], null_text=null, steps=3, seeds=[0, 1], dtype="float64", block=2)
    out = generate(folder, guider="sag", w=1.75, **kw)
    assert torch.isfinite(out).all() and (out - generate(folder, guider="none", **kw)).abs().max() > 1e-5
    with pytest.raises(GuidelabError, match="sag needs a diffusers UNet"):
        sagmod.sag(gd.load(base._save(tmp_path, "dit"), dtype=torch.float64), 2.0)
    with pytest.raises(GuidelabError, match="one self-attention layer"):
        sagmod.sag(den, 2.0, layers="all")
    with pytest.raises(GuidelabError, match="odd integer"):
        sagmod.sag(den, 2.0, kernel_size=4)
    with pytest.raises(GuidelabError, match="finite number"):
        sagmod.sag(den, torch.tensor([2.0, 3.0]))
