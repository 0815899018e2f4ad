"""Prompt in, image out on SDXL, PixArt alpha / sigma and FLUX: tiny pipelines built and saved here (CLIP BPE and
T5 unigram tokenizers written by the test, random weights; no hub), loaded through gd.load_pipeline and compared
with the diffusers pipeline call; every guider on each class; seeds; safety of loading."""

import json
import logging
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from test_diffusers_pipelines import (  # noqa: E402
    DEVICE,
    SCHED,
    clip_text,
    clip_tokenizer,
    load,
    reference,
    sd3_folder,
    sd_folder,
    tiny_unet,
)

from guidelab.errors import GuidelabError  # noqa: E402
from guidelab.integrations import diffusers as gd  # noqa: E402
from guidelab.integrations.diffusers import pipelines as gp  # noqa: E402


def t5_tokenizer(folder):
    """A T5-style fast tokenizer (unigram over characters, ``</s>`` appended, ``<pad>`` = 0) written to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    chars = "abcdefghijklmnopqrstuvwxyz\u2581"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    fast = transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    fast.save_pretrained(folder)
    return fast, len(vocab)


def t5_text(vocab, dim=16):
    torch.manual_seed(1)
    cfg = transformers.T5Config(
        vocab_size=vocab,
        d_model=dim,
        d_ff=2 * dim,
        d_kv=8,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5EncoderModel(cfg).eval()


def vae(blocks=1, latent=4, **config):
    torch.manual_seed(0)
    v = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent,
        block_out_channels=(8,) * blocks,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=8,
    ).eval()
    if config:
        v.register_to_config(**config)
    return v


def sdxl_folder(tmp, sched="EulerDiscreteScheduler", unet_seed=0, **sched_kw):
    tok, vocab = clip_tokenizer(tmp / "tok")
    unet = tiny_unet(
        unet_seed,
        cross_attention_dim=32,  # the two text encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,  # time ids + pooled projection
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=clip_text(vocab),
        text_encoder_2=clip_text(vocab, projection=True),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=getattr(diffusers, sched).from_config({**SCHED, **sched_kw}),
        add_watermarker=False,
    )
    out = tmp / f"sdxl-{sched}-{unet_seed}"
    pipe.save_pretrained(out)
    return out


def pixart_folder(tmp, cls="PixArtAlphaPipeline", sample_size=8, vae_blocks=1, seed=0, sched="DDIMScheduler"):
    tok, vocab = t5_tokenizer(tmp / "t5tok")
    torch.manual_seed(seed)
    net = diffusers.PixArtTransformer2DModel(
        sample_size=sample_size,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        caption_channels=16,
        cross_attention_dim=16,
    )
    pipe = getattr(diffusers, cls)(
        tokenizer=tok,
        text_encoder=t5_text(vocab),
        vae=vae(vae_blocks),
        transformer=net,
        scheduler=getattr(diffusers, sched).from_config({**SCHED, "clip_sample": False}),
    )
    out = tmp / f"{cls}-{sample_size}-{vae_blocks}-{seed}-{sched}"
    pipe.save_pretrained(out)
    return out


def flux_folder(tmp, guidance_embeds=True, seed=0):
    tok, vocab = clip_tokenizer(tmp / "tok")
    tok2, vocab2 = t5_tokenizer(tmp / "t5tok")
    torch.manual_seed(seed)
    net = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=16, max_image_seq_len=256
    )
    pipe = diffusers.FluxPipeline(
        scheduler=sched,
        vae=vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder=clip_text(vocab),
        tokenizer=tok,
        text_encoder_2=t5_text(vocab2),
        tokenizer_2=tok2,
        transformer=net,
    )
    out = tmp / f"flux-{int(guidance_embeds)}-{seed}"
    pipe.save_pretrained(out)
    return out


FLUX_SIZE = {"height": 16, "width": 16}  # packed latents [B, 64, 16]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    return {
        "sdxl": sdxl_folder(tmp),
        "pixart_alpha": pixart_folder(tmp),
        "pixart_sigma": pixart_folder(tmp, "PixArtSigmaPipeline"),
        "flux": flux_folder(tmp),
        "sd3": sd3_folder(tmp),
    }


def latents(shape, seed=3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a red cube", "a blue ball"]


def check_equal(got, ref, off):
    assert got.shape == ref.shape
    assert ref.std() > 1e-2 and (ref - off).abs().max() > 1e-3  # an image, and the guidance bites
    assert (got - ref).abs().max() <= 1e-4


# -- equality with diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("negative", [None, "blurry"])
@pytest.mark.parametrize("sched", ["EulerDiscreteScheduler", "DDIMScheduler"])
def test_sdxl_equals_diffusers(tmp_path, sched, negative):
    kw = {"timestep_spacing": "leading", "steps_offset": 1} if sched == "EulerDiscreteScheduler" else {"clip_sample": False}
    folder = sdxl_folder(tmp_path, sched, **kw)
    L = latents((2, 4, 8, 8))
    args = (folder, "StableDiffusionXLPipeline", PROMPTS)
    ref = reference(*args, 5.0, 5, L, negative_prompt=negative)
    got = load(folder).generate(PROMPTS, negative_prompt=negative, guider="cfg", w=5.0, steps=5, latents=L)
    check_equal(got, ref, reference(*args, 1.0, 5, L))


@pytest.mark.parametrize(
    "cls,sched",
    [
        ("PixArtAlphaPipeline", "DDIMScheduler"),
        ("PixArtSigmaPipeline", "DDIMScheduler"),
        ("PixArtAlphaPipeline", "DPMSolverMultistepScheduler"),  # PixArt folders' own scheduler -> dpmpp_2m
    ],
)
def test_pixart_equals_diffusers(tmp_path, cls, sched):
    folder = pixart_folder(tmp_path, cls, sched=sched)
    L = latents((2, 4, 8, 8))
    args = (folder, cls, PROMPTS)
    ref = reference(*args, 4.5, 4, L, use_resolution_binning=False)  # sample_size 8 has no bin
    got = load(folder).generate(PROMPTS, guider="cfg", w=4.5, steps=4, latents=L)
    check_equal(got, ref, reference(*args, 1.0, 4, L, use_resolution_binning=False))
    neg = reference(*args, 4.5, 4, L, use_resolution_binning=False, negative_prompt="dark")
    got = load(folder).generate(PROMPTS, negative_prompt="dark", guider="cfg", w=4.5, steps=4, latents=L)
    assert (got - neg).abs().max() <= 1e-4 and (neg - ref).abs().max() > 1e-4


@pytest.mark.slow
def test_pixart_resolution_binning_equals_diffusers(tmp_path):
    """sample_size 32 with a 4x VAE: the default 128 px is binned to 256 px (ASPECT_RATIO_256_BIN), sampled at
    latents [4, 64, 64] and resized back to 128 px, as diffusers' use_resolution_binning=True does."""
    folder = pixart_folder(tmp_path, sample_size=32, vae_blocks=3)
    pipe = load(folder)
    assert pipe.size(None, None) == (256, 256, (128, 128))
    L = latents((1, 4, 64, 64))
    ref = reference(folder, "PixArtAlphaPipeline", PROMPTS[:1], 4.5, 2, L)
    got = pipe.generate(PROMPTS[:1], guider="cfg", w=4.5, steps=2, latents=L)
    assert got.shape == ref.shape == (1, 3, 128, 128)
    assert (got - ref).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "family,cls,layers,ours",
    [
        ("sdxl", "StableDiffusionXLPAGPipeline", ["mid"], {}),  # guidelab's default PAG layer on UNets
        ("pixart_sigma", "PixArtSigmaPAGPipeline", ["blocks.0"], {"layers": "transformer_blocks.0"}),
    ],
)
def test_pag_with_cfg_equals_diffusers_pag_pipeline(folders, family, cls, layers, ours):
    """guider="pag", w = 1 + pag_scale, cfg_weight = guidance_scale is diffusers' PAG pipeline (one batched call of
    [negative, prompt, prompt] rows here too)."""
    L = latents((2, 4, 8, 8))
    ref = getattr(diffusers, cls).from_pretrained(folders[family], local_files_only=True, pag_applied_layers=layers)
    ref = ref.to(DEVICE)
    ref.set_progress_bar_config(disable=True)
    kw = {"use_resolution_binning": False} if family.startswith("pixart") else {}

    def call(pag_scale):
        with torch.no_grad():
            return ref(
                PROMPTS, guidance_scale=5.0, pag_scale=pag_scale, num_inference_steps=4, latents=L, output_type="pt", **kw
            ).images

    got = load(folders[family]).generate(PROMPTS, guider="pag", w=4.0, cfg_weight=5.0, steps=4, latents=L, **ours)
    check_equal(got, call(3.0), call(0.0))


def test_sdxl_float16_decodes_in_float32(folders):
    """SDXL's force_upcast: a float16 pipeline decodes with a float32 VAE (and gives it back in float16)."""
    pipe = load(folders["sdxl"], dtype=torch.float16)
    seen = []
    hook = pipe.pipe.vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    x = pipe.generate("a cube", guider="cfg", w=3.0, steps=2)
    hook.remove()
    assert seen == [torch.float32] and pipe.pipe.vae.dtype == torch.float16 and torch.isfinite(x).all()
    ref = load(folders["sdxl"]).generate("a cube", guider="cfg", w=3.0, steps=2)
    assert (x - ref).abs().max() < 0.05


def test_flux_guidance_input_equals_diffusers(folders):
    """guider="none" with guidance=g is FluxPipeline(guidance_scale=g): the distilled model's embedded guidance."""
    L = latents((2, 64, 16))
    args = (folders["flux"], "FluxPipeline", PROMPTS)
    ref = reference(*args, 3.5, 4, L, **FLUX_SIZE)
    got = load(folders["flux"]).generate(PROMPTS, guider="none", guidance=3.5, steps=4, latents=L, **FLUX_SIZE)
    check_equal(got, ref, reference(*args, 1.0, 4, L, **FLUX_SIZE))
    default = load(folders["flux"]).generate(PROMPTS, guider="none", steps=4, latents=L, **FLUX_SIZE)
    assert torch.equal(default, got)  # diffusers' default guidance_scale 3.5


def test_flux_true_cfg_equals_diffusers(folders):
    """guider="cfg", w, a negative prompt is FluxPipeline(true_cfg_scale=w, negative_prompt=...)."""
    L = latents((2, 64, 16))
    args = (folders["flux"], "FluxPipeline", PROMPTS)
    ref = reference(*args, 2.0, 4, L, negative_prompt="dark", true_cfg_scale=4.0, **FLUX_SIZE)
    pipe = load(folders["flux"])
    got = pipe.generate(PROMPTS, negative_prompt="dark", guider="cfg", w=4.0, guidance=2.0, steps=4, latents=L, **FLUX_SIZE)
    check_equal(got, ref, reference(*args, 2.0, 4, L, **FLUX_SIZE))


def test_flux_without_guidance_embeds_equals_diffusers(tmp_path):
    folder = flux_folder(tmp_path, guidance_embeds=False)
    L = latents((1, 64, 16))
    ref = reference(folder, "FluxPipeline", PROMPTS[:1], 1.0, 3, L, negative_prompt="dark", true_cfg_scale=3.0, **FLUX_SIZE)
    pipe = load(folder)
    got = pipe.generate(PROMPTS[:1], negative_prompt="dark", guider="cfg", w=3.0, steps=3, latents=L, **FLUX_SIZE)
    assert (got - ref).abs().max() <= 1e-4
    with pytest.raises(GuidelabError, match="has none"):
        pipe.generate("a", guider="none", guidance=3.5, steps=2, **FLUX_SIZE)


def test_flux_dynamic_shift_grid(folders):
    """schedule="pipeline" is FluxPipeline's grid: linspace(1, 1/n, n) shifted at mu from the packed length."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = load(folders["flux"])
    c = pipe.config
    for size, seq in ((16, 64), (32, 256)):
        sig = pipe.sigmas(None, 6, "pipeline", gp.flux.packed_shape(pipe.pipe, size, size))
        s = diffusers.FlowMatchEulerDiscreteScheduler.from_config(c)
        mu = calculate_shift(seq, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])
        s.set_timesteps(sigmas=[1 - k / 6 for k in range(6)], mu=mu)
        t = sig / (1 + sig)
        assert torch.allclose(t[1:].float(), s.sigmas[1:].float(), atol=1e-7) and sig[0] == gp.flow.SIGMA_T1


def test_latent_shape_checked(folders):
    pipe = load(folders["flux"])
    with pytest.raises(GuidelabError, match=r"latents must be \[N, 64, 16\]"):
        pipe.generate("a", guider="none", steps=2, latents=torch.zeros(1, 4, 8, 8), **FLUX_SIZE)


# -- every guider on every new class ----------------------------------------------------------------

FAMILIES = ["sdxl", "pixart_alpha", "pixart_sigma", "sd3", "flux"]
#: guider -> (w, options); the attention guiders also with CFG in the same call (cfg_weight).
GUIDERS = {
    "cfg": (3.0, {}),
    "apg": (3.0, {}),
    "cfgpp": (0.5, {}),
    "cfg_zero_star": (3.0, {}),
    "rescale": (3.0, {}),
    "icg": (3.0, {}),
    "tsg": (3.0, {}),
    "pag": (3.0, {}),
    "seg": (3.0, {}),
    "slg": (3.0, {}),
    "pag+cfg": (3.0, {"cfg_weight": 3.0}),
    "seg+cfg": (3.0, {"cfg_weight": 3.0}),
    "slg+cfg": (3.0, {"cfg_weight": 3.0}),
    "nag": (4.0, {}),
    "nag+cfg": (4.0, {"cfg_weight": 3.0}),
}
#: (family, guider) combinations that refuse with one clear error, and the error.
REFUSED: dict[tuple[str, str], str] = {}  # none left: TSG on SD3 / FLUX and PAG / SEG / SLG on FLUX now run


def _kw(family):
    return FLUX_SIZE if family == "flux" else {}


def _options(family, guider):
    """The guider's options; the one-block PixArt / SD3 / FLUX have none of the default PAG / SEG / SLG blocks
    (blocks.1, transformer_blocks.7-9): their only block is named (FLUX: its double- and its single-stream block)."""
    w, opts = GUIDERS[guider]
    if (family.startswith("pixart") or family in ("sd3", "flux")) and guider.split("+")[0] in ("pag", "seg", "slg"):
        opts = {**opts, "layers": "transformer_blocks.0"}
    if guider.startswith("slg"):  # 3 steps hold no step of SLG's default window (test_slg_step_window_in_generate)
        opts = {**opts, "interval": (0.0, math.inf)}
    return w, opts


@pytest.mark.parametrize("guider", list(GUIDERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_guider_runs(folders, family, guider):
    pipe = load(folders[family])
    w, opts = _options(family, guider)
    name = guider.split("+")[0]
    kw = {**_kw(family), "steps": 3, "seeds": [0]}
    if (family, guider) in REFUSED:
        with pytest.raises(GuidelabError, match=REFUSED[(family, guider)]):
            pipe.generate("a cube", guider=name, w=w, **opts, **kw)
        return
    x = pipe.generate("a cube", guider=name, w=w, **opts, **kw)
    base = pipe.generate("a cube", guider="none", **kw)
    assert x.shape == base.shape and torch.isfinite(x).all()
    assert (x - base).abs().max() > 1e-5
    if name != "cfgpp":  # w = 1 is no guidance: bit-identical to the unguided run
        one = pipe.generate("a cube", guider=name, w=1.0, **{k: v for k, v in opts.items() if k != "cfg_weight"}, **kw)
        assert torch.equal(one, base)


def test_pixart_default_attention_layers_named(folders):
    """diffusers' default PAG layer (blocks.1) does not exist in a one-block PixArt: one error naming it."""
    pipe = load(folders["pixart_alpha"])
    with pytest.raises(GuidelabError, match=r"no layer of PixArtTransformer2DModel matches layers=\['blocks.1'\]"):
        pipe.generate("a cube", guider="pag", w=3.0, steps=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_seeds_per_sample_and_interval(folders, family):
    pipe = load(folders[family])
    kw = {**_kw(family), "steps": 3}
    c = pipe.generate("a cube", guider="cfg", w=3.0, seeds=[7, 5, 9], **kw)
    d = pipe.generate("a cube", guider="cfg", w=3.0, seeds=[5], **kw)
    assert (c[1] - d[0]).abs().max() < 1e-5 and (c[0] - c[1]).abs().max() > 1e-3
    none = pipe.generate("a cube", guider="cfg", w=3.0, seeds=[5], interval=(1e11, 1e12), **kw)  # no step inside
    assert torch.equal(none, pipe.generate("a cube", guider="none", seeds=[5], **kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_autoguidance_second_folder(folders, family, tmp_path):
    make = {
        "sdxl": lambda: sdxl_folder(tmp_path, unet_seed=1),
        "pixart_alpha": lambda: pixart_folder(tmp_path, seed=1),
        "pixart_sigma": lambda: pixart_folder(tmp_path, "PixArtSigmaPipeline", seed=1),
        "flux": lambda: flux_folder(tmp_path, seed=1),
        "sd3": lambda: sd3_folder(tmp_path, seed=1),
    }
    pipe, weak, kw = load(folders[family]), make[family](), {**_kw(family), "steps": 3, "seeds": [0]}
    base = pipe.generate("a cube", guider="none", **kw)
    x = pipe.generate("a cube", guider="autoguidance", w=2.0, guide=weak, **kw)
    assert torch.isfinite(x).all() and (x - base).abs().max() > 1e-4
    assert torch.equal(pipe.generate("a cube", guider="autoguidance", w=1.0, guide=weak, **kw), base)


# -- loading: safety, misuse --------------------------------------------------------------------------


def test_pickle_weights_refused_unless_allowed(tmp_path, caplog):
    folder = sd_folder(tmp_path)
    vae_dir = folder / "vae"
    from safetensors.torch import load_file

    weights = load_file(vae_dir / "diffusion_pytorch_model.safetensors")
    (vae_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(weights, vae_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(GuidelabError, match=r"weights of vae are pickle files only .* allow_pickle=True"):
        load(folder)
    with caplog.at_level(logging.WARNING, logger="guidelab.integrations.diffusers"):
        pipe = load(folder, allow_pickle=True)
    assert "loading pickle weights of vae" in caplog.text
    ref = load(sd_folder(tmp_path / "again"))
    assert torch.equal(pipe.generate("a", guider="cfg", w=3.0, steps=2), ref.generate("a", guider="cfg", w=3.0, steps=2))


@pytest.mark.parametrize("prediction,steps", [("epsilon", 6), ("v_prediction", 5), ("epsilon", 1), ("epsilon", 2)])
def test_pndm_plms_equals_diffusers(tmp_path, prediction, steps):
    """SD 1.x's own scheduler (PNDM, skip_prk_steps, set_alpha_to_one=False, steps_offset 1) = sampler 'plms'."""
    kw = {"skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}
    folder = sd_folder(tmp_path, prediction, sched="PNDMScheduler", **kw)
    L = latents((2, 4, 8, 8))
    args = (folder, "StableDiffusionPipeline", PROMPTS)
    ref = reference(*args, 5.0, steps, L)
    pipe = load(folder)
    calls = []
    hook = pipe.net.register_forward_pre_hook(lambda m, a: calls.append(1))
    got = pipe.generate(PROMPTS, guider="cfg", w=5.0, steps=steps, latents=L)
    hook.remove()
    check_equal(got, ref, reference(*args, 1.0, steps, L))
    assert len(calls) == (steps + 1 if steps > 1 else 1)  # PNDM's extra call at the first step
    ddim = pipe.generate(PROMPTS, guider="cfg", w=5.0, steps=steps, latents=L, sampler="ddim")  # its grid, DDIM
    assert steps == 1 or (ddim - ref).abs().max() > 1e-3


def test_pndm_runge_kutta_warmup_refused(tmp_path):
    pipe = load(sd_folder(tmp_path, sched="PNDMScheduler", skip_prk_steps=False))
    with pytest.raises(GuidelabError, match="skip_prk_steps=False.* has no guidelab equal"):
        pipe.generate("a", guider="cfg", w=3.0, steps=3)
    with pytest.raises(GuidelabError, match="cfgpp needs a sampler with the renoise step"):
        load(sd_folder(tmp_path / "b", sched="PNDMScheduler", skip_prk_steps=True)).generate("a", guider="cfgpp", w=0.5)
    assert torch.isfinite(pipe.generate("a", guider="cfg", w=3.0, steps=3, sampler="ddim")).all()


def test_missing_component_and_class(tmp_path, folders):
    bad = tmp_path / "bad"
    bad.mkdir()
    spec = json.loads((folders["flux"] / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps(spec))
    for comp in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (bad / comp).mkdir()
    with pytest.raises(GuidelabError, match="component 'text_encoder_2' is missing"):
        load(bad)
    (bad / "model_index.json").write_text(json.dumps({**spec, "_class_name": "FluxControlPipeline"}))
    with pytest.raises(GuidelabError, match="FluxPipeline"):
        load(bad)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_slg_step_window_in_generate(folders, family):
    """guider="slg" without interval guides only diffusers' SLG window (10 steps: step 1 of 0..9, one call of 2N rows;
    every other step one unguided call of N rows), as interval=step_window(...) does; (0, inf) guides every step;
    too few steps for the window is one error."""
    pipe = load(folders[family])
    rows = []

    def count(module, args, kw):
        rows.append(len(kw["hidden_states"] if "hidden_states" in kw else args[0]))

    kw = {"steps": 10, "seeds": [0], "layers": "transformer_blocks.0", **_kw(family)}
    hook = pipe.net.register_forward_pre_hook(count, with_kwargs=True)
    try:
        windowed = pipe.generate("a cube", guider="slg", w=3.0, **kw)
        assert rows == [1, 2] + [1] * 8
        rows.clear()
        every = pipe.generate("a cube", guider="slg", w=3.0, interval=(0.0, math.inf), **kw)
        assert rows == [2] * 10
    finally:
        hook.remove()
    h, w_img, _ = pipe.size(kw.get("height"), kw.get("width"))
    sig = pipe.sigmas(pipe.denoiser({}, (h, w_img)), 10, "pipeline", pipe.latent_shape(h, w_img))
    explicit = pipe.generate("a cube", guider="slg", w=3.0, interval=gd.step_window(sig, *gd.SLG_WINDOW), **kw)
    base = pipe.generate("a cube", guider="none", **{k: v for k, v in kw.items() if k != "layers"})
    assert torch.equal(windowed, explicit) and (windowed - base).abs().max() > 1e-6 and (every - windowed).abs().max() > 1e-6
    with pytest.raises(GuidelabError, match="holds no step"):
        pipe.generate("a cube", guider="slg", w=3.0, **{**kw, "steps": 5})


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_is_one_batched_call_per_step(folders, family):
    """cond and negative rows share one network call per step (FLUX's true CFG included: diffusers makes two)."""
    pipe = load(folders[family])
    rows = []

    def count(module, args, kw):
        rows.append(len(kw["hidden_states"] if "hidden_states" in kw else args[0]))

    hook = pipe.net.register_forward_pre_hook(count, with_kwargs=True)
    try:
        neg = {"negative_prompt": "dark"}
        pipe.generate(PROMPTS, guider="cfg", w=3.0, steps=3, seeds=[0, 1], **neg, **_kw(family))
    finally:
        hook.remove()
    assert rows == [4, 4, 4]
