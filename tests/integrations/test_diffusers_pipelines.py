"""Prompt in, image out: gd.load_pipeline + generate on tiny pipelines built and saved here (no hub), equal to
the diffusers pipeline call; guiders, seeds and misuse. ``GUIDELAB_DEVICE=cuda`` runs both sides on that device
(bench/gpu_check.sh; float32 with TF32 off keeps the 1e-4 equality)."""

import json
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from guidelab.errors import GuidelabError  # noqa: E402
from guidelab.integrations.diffusers import pipelines as gp  # noqa: E402

#: Where both guidelab's and diffusers' pipelines run (default cpu).
DEVICE = os.environ.get("GUIDELAB_DEVICE", "cpu")


def load(folder, **kw):
    """gd.load_pipeline on :data:`DEVICE`."""
    return gp.load_pipeline(folder, device=DEVICE, **kw)


def clip_tokenizer(folder):
    """A character-level CLIP BPE tokenizer (every byte a token, no merges) written to ``folder``."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]  # GPT-2's byte -> unicode table
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=12)
    return tok, len(vocab)


def clip_text(vocab, dim=16, projection=False):
    cfg = transformers.CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=12,
        projection_dim=dim,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    torch.manual_seed(0)
    return (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(cfg).eval()


def tiny_vae(latent=4):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=8,
    ).eval()


SCHED = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def tiny_unet(seed=0, cross_attention_dim=16, **extra):
    """A tiny text-conditioned UNet2DConditionModel on 4-channel 8x8 latents (SD; SDXL with ``extra``)."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **extra,
    )


def sd_folder(tmp, prediction="epsilon", sched="DDIMScheduler", unet_seed=0, text_seed=0, **sched_kw):
    tok, vocab = clip_tokenizer(tmp / "tok")
    unet = tiny_unet(unet_seed)
    s = getattr(diffusers, sched).from_config({**SCHED, "prediction_type": prediction, **sched_kw})
    text = clip_text(vocab)
    if text_seed:
        torch.manual_seed(text_seed)
        text = type(text)(text.config).eval()
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=s,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = tmp / f"sd-{prediction}-{sched}-{unet_seed}-{text_seed}"
    pipe.save_pretrained(out)
    return out


def reference(folder, cls, prompt, g, steps, latents, **kw):
    spec = json.loads((folder / "model_index.json").read_text())
    absent = {k: None for k, v in spec.items() if isinstance(v, list) and v[0] is None}
    pipe = getattr(diffusers, cls).from_pretrained(folder, local_files_only=True, **absent).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt, guidance_scale=g, num_inference_steps=steps, latents=latents, output_type="pt", **kw).images


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_folder(tmp_path_factory.mktemp("sd"))


@pytest.mark.parametrize(
    "prediction,sched,kw",
    [
        ("epsilon", "DDIMScheduler", {}),
        ("v_prediction", "DDIMScheduler", {"clip_sample": True}),
        ("epsilon", "EulerDiscreteScheduler", {}),
    ],
)
def test_sd_equals_diffusers(tmp_path, prediction, sched, kw):
    folder = sd_folder(tmp_path, prediction, sched, **kw)
    torch.manual_seed(3)
    L = torch.randn(2, 4, 8, 8)
    args = (folder, "StableDiffusionPipeline", ["a red cube", "a blue ball"])
    ref = reference(*args, 5.0, 6, L)
    pipe = load(folder)
    got = pipe.generate(["a red cube", "a blue ball"], guider="cfg", w=5.0, steps=6, latents=L, seeds=[0, 1])
    assert got.shape == ref.shape == (2, 3, 8, 8)
    assert ref.std() > 1e-2 and (ref - reference(*args, 1.0, 6, L)).abs().max() > 1e-3  # an image, and CFG bites
    assert (got - ref).abs().max() <= 1e-4


def test_w1_is_unguided_and_seeds_per_sample(sd):
    pipe = load(sd)
    a = pipe.generate("a cube", guider="cfg", w=1.0, steps=4, seeds=[5])
    b = pipe.generate("a cube", guider="none", steps=4, seeds=[5])
    assert torch.equal(a, b)
    c = pipe.generate("a cube", guider="cfg", w=3.0, steps=4, seeds=[7, 5, 9])
    d = pipe.generate("a cube", guider="cfg", w=3.0, steps=4, seeds=[5])
    assert (c[1] - d[0]).abs().max() < 1e-5
    assert (c[0] - c[1]).abs().max() > 1e-3


@pytest.mark.parametrize("guider", ["apg", "cfgpp", "cfg_zero_star", "rescale", "icg", "tsg", "pag", "seg", "slg"])
def test_every_guider_runs(sd, guider):
    pipe = load(sd)
    w = 0.5 if guider == "cfgpp" else 3.0
    sampler = "euler" if guider != "cfgpp" else "euler"
    steps = 6 if guider == "slg" else 3  # slg's default step window (0.01 n < i < 0.2 n) needs n >= 6
    x = pipe.generate("a cube", guider=guider, w=w, steps=steps, seeds=[0], sampler=sampler)
    base = pipe.generate("a cube", guider="none", steps=steps, seeds=[0], sampler=sampler)
    assert x.shape == (1, 3, 8, 8) and torch.isfinite(x).all()
    assert (x - base).abs().max() > 1e-5


def test_bad_inputs(sd, tmp_path):
    pipe = load(sd)
    with pytest.raises(GuidelabError, match="one prompt or one per seed"):
        pipe.generate(["a", "b"], seeds=[0, 1, 2], steps=2)
    with pytest.raises(GuidelabError, match="has none"):
        pipe.generate("a", negative_prompt="b", guider="pag", steps=2)
    with pytest.raises(GuidelabError, match="has none"):  # unguided: the negative prompt would be ignored
        pipe.generate("a", negative_prompt="b", guider="none", steps=2)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(GuidelabError, match="not supported; allowed: StableDiffusionPipeline"):
        load(bad)
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(GuidelabError, match="component 'unet' is missing"):
        load(bad)


def sd3_folder(tmp, seed=0, **sched):
    tok, vocab = clip_tokenizer(tmp / "tok")
    torch.manual_seed(seed)
    net = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=8,
    )
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1, scaling_factor=1.5)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=net,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **sched}),
        vae=vae,
        text_encoder=clip_text(vocab, projection=True),
        tokenizer=tok,
        text_encoder_2=clip_text(vocab, projection=True),
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    out = tmp / f"sd3-{seed}-{len(sched)}"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return sd3_folder(tmp_path_factory.mktemp("sd3"))


def test_sd3_equals_diffusers(sd3):
    torch.manual_seed(3)
    L = torch.randn(2, 4, 8, 8)
    args = (sd3, "StableDiffusion3Pipeline", ["a red cube", "a blue ball"])
    ref = reference(*args, 4.0, 5, L)
    got = load(sd3).generate(["a red cube", "a blue ball"], guider="cfg", w=4.0, steps=5, latents=L, seeds=[0, 1])
    assert got.shape == ref.shape == (2, 3, 8, 8)
    assert ref.std() > 1e-2 and (ref - reference(*args, 1.0, 5, L)).abs().max() > 1e-3  # an image, and CFG bites
    assert (got - ref).abs().max() <= 1e-4


def test_sd3_dynamic_shift_equals_diffusers(tmp_path):
    """use_dynamic_shifting: mu from the latent patch count (max_shift default 1.16), as StableDiffusion3Pipeline."""
    folder = sd3_folder(tmp_path, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    torch.manual_seed(3)
    L = torch.randn(2, 4, 8, 8)
    args = (folder, "StableDiffusion3Pipeline", ["a red cube", "a blue ball"])
    ref = reference(*args, 4.0, 4, L)
    got = load(folder).generate(["a red cube", "a blue ball"], guider="cfg", w=4.0, steps=4, latents=L)
    assert (got - ref).abs().max() <= 1e-4
    fixed = reference(sd3_folder(tmp_path), "StableDiffusion3Pipeline", args[2], 4.0, 4, L)
    assert (fixed - ref).abs().max() > 1e-3  # the dynamic shift changes the grid


@pytest.mark.parametrize("guider", ["cfg_zero_star", "apg", "rescale"])
def test_sd3_guiders(sd3, guider):
    pipe = load(sd3)
    x = pipe.generate("a cube", guider=guider, w=3.0, steps=3, seeds=[0, 1])
    base = pipe.generate("a cube", guider="none", steps=3, seeds=[0, 1])
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    assert (x - base).abs().max() > 1e-5


def test_sd3_w1_and_attention_guiders(sd3):
    pipe = load(sd3)
    assert torch.equal(
        pipe.generate("a", guider="cfg", w=1.0, steps=3, seeds=[2]), pipe.generate("a", guider="none", steps=3, seeds=[2])
    )
    # SD3's joint-attention hooks: diffusers' default SLG blocks (7-9) are named; the one-block model has none
    with pytest.raises(GuidelabError, match=r"slg: no layer of SD3Transformer2DModel matches"):
        pipe.generate("a", guider="slg", w=3.0, steps=6)  # 6 steps: slg's default step window holds step 1
    x = pipe.generate("a", guider="slg", w=3.0, steps=6, layers="transformer_blocks.0")
    assert torch.isfinite(x).all() and (x - pipe.generate("a", guider="none", steps=6)).abs().max() > 1e-5


def test_cli_generate(sd, tmp_path):
    from click.testing import CliRunner

    from guidelab.app.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(
        main, ["generate", str(sd), "--prompt", "a cube", "--weight", "3", "--steps", "2", "--seeds", "0-1", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["000000000.png", "000000001.png", "grid.png"]
    help_text = CliRunner().invoke(main, ["generate", "--help"]).output
    assert "sd3" in help_text and "--negative-prompt" in help_text


def test_autoguidance_second_folder(sd, tmp_path):
    pipe = load(sd)
    weak = sd_folder(tmp_path, unet_seed=1)
    x = pipe.generate("a cube", guider="autoguidance", w=2.0, guide=weak, steps=3, seeds=[0])
    base = pipe.generate("a cube", guider="none", steps=3, seeds=[0])
    assert torch.isfinite(x).all() and (x - base).abs().max() > 1e-4
    assert torch.equal(pipe.generate("a cube", guider="autoguidance", w=1.0, guide=weak, steps=3, seeds=[0]), base)
    other_text = sd_folder(tmp_path, unet_seed=1, text_seed=5)
    with pytest.raises(GuidelabError, match="guide's text_encoder differs"):
        pipe.generate("a cube", guider="autoguidance", w=2.0, guide=other_text, steps=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_half_precision_end_to_end(sd, dtype):
    """Text encoder, UNet and VAE in half precision, the sampler state float32; close to the float32 run."""
    half = load(sd, dtype=dtype)
    assert half.net.dtype == half.pipe.text_encoder.dtype == half.pipe.vae.dtype == dtype
    x = half.generate("a cube", guider="cfg", w=3.0, steps=3, seeds=[0])
    ref = load(sd).generate("a cube", guider="cfg", w=3.0, steps=3, seeds=[0])
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert 0 < (x - ref).abs().max() < 0.1


def test_interval_guides_only_inside(sd):
    pipe = load(sd)
    full = pipe.generate("a cube", guider="cfg", w=3.0, steps=4, seeds=[0])
    none = pipe.generate("a cube", guider="cfg", w=3.0, steps=4, seeds=[0], interval=(1e6, 1e7))  # no step inside
    part = pipe.generate("a cube", guider="cfg", w=3.0, steps=4, seeds=[0], interval=(0.0, 2.0))
    assert torch.equal(none, pipe.generate("a cube", guider="none", steps=4, seeds=[0]))
    assert (part - full).abs().max() > 1e-5 and (part - none).abs().max() > 1e-5
