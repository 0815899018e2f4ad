"""Text-conditioned diffusers transformers (PixArt) as denoisers, and CFG combined with PAG/SEG/SLG.

Tiny randomly initialised PixArt models saved to and loaded from a temporary folder, float64 on both sides
(see test_diffusers.py). References are written the way diffusers' PixArt pipelines run: CFG on one
concatenated batch [negative, prompt] with attention masks, ``added_cond_kwargs``, learned sigma dropped;
CFG + PAG with diffusers' own ``PAGCFGIdentitySelfAttnProcessor2_0`` on [negative, prompt, prompt]."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, PixArtTransformer2DModel, Transformer2DModel
from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

from guidelab import guidance, samplers
from guidelab.app.diffusers_generate import generate
from guidelab.errors import GuidelabError
from guidelab.integrations import diffusers as gd

B, C, H, L, CAPTION = 2, 3, 8, 5, 12
ARGS = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": C,
    "out_channels": 2 * C,
    "num_layers": 2,
    "sample_size": H,
    "patch_size": 2,
    "cross_attention_dim": 16,
    "caption_channels": CAPTION,
}


def _model(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "legacy":  # saved as Transformer2DModel (older PixArt folders)
        return Transformer2DModel(norm_type="ada_norm_single", num_embeds_ada_norm=1000, **ARGS)
    if kind == "micro":  # size embeddings need a width divisible by 3
        return PixArtTransformer2DModel(
            use_additional_conditions=True, **{**ARGS, "attention_head_dim": 12, "cross_attention_dim": 24}
        )
    return PixArtTransformer2DModel(**ARGS)


def _save(tmp_path, kind="pixart", prediction_type="epsilon"):
    folder = tmp_path / f"{kind}-{prediction_type}"
    _model(kind).save_pretrained(folder)
    DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False).save_config(folder)
    return folder


def _prompts(seed=0):
    """Prompt embeddings [B, L, CAPTION] with padding masks, and a null embedding [1, L, CAPTION] with its mask."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, L, CAPTION, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    null = torch.randn(1, L, CAPTION, generator=g, dtype=torch.float64)
    null_mask = torch.tensor([[1, 0, 0, 0, 0]])
    return emb, mask, null, null_mask


def _micro(kind):
    if kind != "micro":
        return {}
    return {
        "resolution": torch.tensor([[64.0, 64.0]] * B, dtype=torch.float64),
        "aspect_ratio": torch.ones(B, 1, dtype=torch.float64),
    }


def _pipeline_output(model, x_in, t, emb, mask, null, null_mask, micro, w_cfg, pag_scale=None):
    """One model call on the concatenated batch, combined as diffusers' PixArt (PAG) pipelines do."""
    k = 2 if pag_scale is None else 3
    embs = [null.expand(B, -1, -1), emb, emb][:k]
    masks = [null_mask.expand(B, -1), mask, mask][:k]
    added = {
        key: (torch.cat([v] * k) if key in micro else None)
        for key, v in {"resolution": micro.get("resolution"), "aspect_ratio": micro.get("aspect_ratio")}.items()
    }
    out = model(
        torch.cat([x_in] * k),
        encoder_hidden_states=torch.cat(embs),
        encoder_attention_mask=torch.cat(masks),
        timestep=torch.as_tensor(t).expand(k * B),
        added_cond_kwargs=added,
    ).sample
    out = out.chunk(2, dim=1)[0]  # learned sigma: keep the mean channels
    if pag_scale is None:
        u, c = out.chunk(2)
        return u + w_cfg * (c - u)
    u, c, p = out.chunk(3)
    return u + w_cfg * (c - u) + pag_scale * (c - p)


def _count_calls(model):
    calls = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["hidden_states"].shape[0] if "hidden_states" in kwargs else args[0].shape[0]),
        with_kwargs=True,
    )
    return calls


def _ddim_reference(model, folder, x_vp, steps, **kw):
    sched = DDIMScheduler.from_pretrained(folder, local_files_only=True)
    sched.set_timesteps(steps)
    x = x_vp.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(_pipeline_output(model, x, t, **kw), t, x).prev_sample
    return x


@pytest.mark.parametrize("kind,prediction_type", [("pixart", "epsilon"), ("legacy", "v_prediction"), ("micro", "epsilon")])
def test_pixart_ddim_cfg_equals_the_pipeline_loop(tmp_path, kind, prediction_type):
    """guidelab ddim + CFG (null embedding and mask swapped in, one call of 2B rows per step) equals the PixArt
    pipeline's DDIM loop to 1e-4; the masks matter; the legacy Transformer2DModel folder loads too."""
    folder = _save(tmp_path, kind, prediction_type)
    emb, mask, null, null_mask = _prompts()
    den = gd.load(folder, dtype=torch.float64, null_text=null, null_mask=null_mask)
    assert den.condition.key == "encoder_hidden_states" and den.adaln_single and den.micro == (kind == "micro")
    sigmas = den.sigmas(8, "leading")
    x_vp = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    micro = _micro(kind)
    ref = _ddim_reference(den.model, folder, x_vp, 8, emb=emb, mask=mask, null=null, null_mask=null_mask, micro=micro, w_cfg=4.0)
    calls = _count_calls(den.model)
    x = x_vp * (1 + sigmas[0] ** 2).sqrt()
    cond = {"encoder_hidden_states": emb, gd.MASK: mask, **micro}
    ours = samplers.ddim(guidance.cfg(den, 4.0), x, sigmas, cond=cond)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    assert calls == [2 * B] * 8
    unmasked = gd.load(folder, dtype=torch.float64, null_text=null)
    no_mask = samplers.ddim(guidance.cfg(unmasked, 4.0), x, sigmas, cond={"encoder_hidden_states": emb, **micro})
    assert (no_mask - ours).abs().max() > 1e-3  # the masks are used
    assert (samplers.ddim(den, x, sigmas, cond=cond) - ours).abs().max() > 1e-2  # guidance matters


def test_micro_conditions_are_required_and_null_shapes_checked(tmp_path):
    den = gd.load(_save(tmp_path, "micro"), dtype=torch.float64)
    emb, _, null, _ = _prompts()
    x, sigma = torch.randn(B, C, H, H, dtype=torch.float64), torch.full((B,), 2.0, dtype=torch.float64)
    with pytest.raises(GuidelabError, match="micro-conditioned .*resolution"):
        den(x, sigma, encoder_hidden_states=emb)
    den = gd.load(_save(tmp_path), dtype=torch.float64, null_text=null[:, :3])
    with pytest.raises(GuidelabError, match="pad both to the same length"):
        guidance.cfg(den, 2.0)(x, sigma, encoder_hidden_states=emb)
    with pytest.raises(GuidelabError, match="null_mask needs null_text"):
        gd.load(_save(tmp_path), null_mask=torch.ones(1, L))
    with pytest.raises(GuidelabError, match="cfg with one network needs its null condition"):
        guidance.cfg(gd.load(_save(tmp_path)), 2.0)


@pytest.mark.parametrize("mode", ["pag", "seg", "slg"])
def test_perturbation_changes_only_the_marked_rows(tmp_path, mode):
    den = gd.load(_save(tmp_path), dtype=torch.float64).with_perturbation(gd.Perturbation(mode, "all"))
    emb, mask, _, _ = _prompts()
    x = torch.randn(B, C, H, H, dtype=torch.float64) * 3
    sigma = torch.full((B,), 3.0, dtype=torch.float64)
    cond = {"encoder_hidden_states": emb, gd.MASK: mask}
    with torch.no_grad():
        plain = den(x, sigma, **cond)
        out = den(x, sigma, **cond, perturb=torch.tensor([False, True]))
    assert torch.equal(out[0], plain[0]) and (out[1] - plain[1]).abs().max() > 1e-3
    names = [n for n, _ in den.perturbation.modules(den.model)]
    expect = (
        ["transformer_blocks.0", "transformer_blocks.1"]
        if mode == "slg"
        else ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    )  # self-attention only, never cross-attention
    assert names == expect


def test_pag_with_cfg_equals_diffusers_pag_processor_loop(tmp_path):
    """CFG + PAG (guidance_scale 3, pag_scale 1.5 = w - 1) in one call of 3B rows per step equals the DDIM loop
    of a model whose self-attentions run diffusers' PAGCFGIdentitySelfAttnProcessor2_0 on [neg, prompt, prompt];
    separate passes (3 calls of B rows) give the same samples."""
    folder = _save(tmp_path)
    emb, mask, null, null_mask = _prompts(3)
    den = gd.load(folder, dtype=torch.float64, null_text=null, null_mask=null_mask)
    ref_model = PixArtTransformer2DModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float64)
    for block in ref_model.transformer_blocks:
        block.attn1.set_processor(PAGCFGIdentitySelfAttnProcessor2_0())
    sigmas = den.sigmas(6, "leading")  # the saved DDIM config's spacing
    x_vp = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = _ddim_reference(
        ref_model, folder, x_vp, 6, emb=emb, mask=mask, null=null, null_mask=null_mask, micro={}, w_cfg=3.0, pag_scale=1.5
    )
    x = x_vp * (1 + sigmas[0] ** 2).sqrt()
    cond = {"encoder_hidden_states": emb, gd.MASK: mask}
    calls = _count_calls(den.model)
    ours = samplers.ddim(gd.pag(den, 2.5, layers="all", cfg_weight=3.0), x, sigmas, cond=cond)
    assert calls == [3 * B] * 6
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    calls.clear()
    separate = samplers.ddim(gd.pag(den, 2.5, layers="all", cfg_weight=3.0, batched=False), x, sigmas, cond=cond)
    assert calls == [B] * 18 and torch.allclose(separate, ours, atol=1e-8)


def test_cli_pixart_pag_with_cfg_and_masks(tmp_path, monkeypatch, capsys):
    """``guidelab diffusers --prompt-embeds`` (embeddings and masks from one safetensors file) with PAG + CFG
    equals ``generate`` with the same arguments; --cfg-weight with a guider other than pag/seg/slg is refused."""
    import numpy as np
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from guidelab.app import cli

    folder = _save(tmp_path)
    emb, mask, null, null_mask = _prompts()
    tensors = {
        "prompt_embeds": emb[:1].float(),
        "prompt_attention_mask": mask[:1],
        "null_embeds": null.float(),
        "null_attention_mask": null_mask,
    }
    save_file(tensors, str(tmp_path / "emb.safetensors"))
    out = tmp_path / "out"
    args = [
        "diffusers",
        str(folder),
        "--out",
        str(out),
        "--guider",
        "pag",
        "--weight",
        "2",
        "--cfg-weight",
        "3",
        "--sampler",
        "dpmpp_2m",
        "--steps",
        "4",
        "--seeds",
        "1-3",
        "--batch",
        "2",
        "--prompt-embeds",
        str(tmp_path / "emb.safetensors"),
    ]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["000000001.png", "000000002.png", "000000003.png", "samples.npz"]
    ref = generate(
        folder,
        guider="pag",
        w=2.0,
        cfg_weight=3.0,
        sampler="dpmpp_2m",
        steps=4,
        seeds=[1, 2, 3],
        batch=2,
        prompt_embeds=tensors["prompt_embeds"],
        prompt_mask=mask[:1],
        null_text=tensors["null_embeds"],
        null_mask=null_mask,
    )
    unmasked = generate(
        folder,
        guider="pag",
        w=2.0,
        cfg_weight=3.0,
        sampler="dpmpp_2m",
        steps=4,
        seeds=[1, 2, 3],
        prompt_embeds=tensors["prompt_embeds"],
        null_text=tensors["null_embeds"],
    )
    with np.load(out / "samples.npz") as f:
        assert np.allclose(f["x"], ref.numpy(), rtol=1e-6, atol=1e-4)  # float32, |x| ~ 500
        assert not np.allclose(f["x"], unmasked.numpy(), atol=1e-3)  # the CLI passed the masks on
    monkeypatch.setattr("sys.argv", ["guidelab", *args[:5], "cfg", *args[6:]])
    with pytest.raises(SystemExit) as e:
        cli.run()
    assert e.value.code == 2 and "cfg_weight combines CFG with pag, seg or slg" in capsys.readouterr().err


def test_generate_tells_micro_conditioned_models_the_pipeline_default_resolution(tmp_path):
    """generate() on a micro-conditioned PixArt passes resolution = 8 x sample_size and aspect ratio 1 (the
    pipeline's default), equal to the sampler called by hand; another resolution changes the samples."""
    from guidelab.rng import SampleNoise

    folder = _save(tmp_path, "micro")
    emb, _, null, _ = _prompts()
    kw = {
        "guider": "cfg",
        "w": 2.0,
        "sampler": "euler",
        "steps": 3,
        "seeds": [4, 5],
        "prompt_embeds": emb[:1],
        "null_text": null,
        "dtype": torch.float64,
    }
    default, other = generate(folder, **kw), generate(folder, resolution=16, **kw)
    den = gd.load(folder, dtype=torch.float64, null_text=null)
    noise = SampleNoise([4, 5])
    sigmas = gd.make_sigmas(den, 3)
    x = noise.randn([C, H, H], dtype=torch.float64) * sigmas[0]
    cond = {
        "encoder_hidden_states": emb[:1].expand(2, -1, -1),
        "resolution": torch.full((2, 2), 8.0 * H),
        "aspect_ratio": torch.ones(2, 1),
    }
    ref = samplers.euler(guidance.cfg(den, 2.0), x, sigmas, cond=cond, noise=noise)
    assert torch.allclose(default, ref, atol=1e-10)
    assert (default - other).abs().max() > 1e-3
