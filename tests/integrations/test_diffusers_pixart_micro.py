"""PixArt alpha's micro-conditioning through gd.load_pipeline: a tiny PixArtAlphaPipeline whose transformer has
``sample_size`` 128 (diffusers' 1024 px model, the one size its pipeline passes ``resolution`` / ``aspect_ratio``
for) with ``use_additional_conditions`` on, sampled at 16 x 24 px with resolution binning off on both sides
(binning would snap to ~1 Mpx; the patch embedding recomputes its positions for the small grid), compared with
diffusers' PixArtAlphaPipeline call; a micro-conditioned model the pipeline gives no micro-conditions is refused."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_diffusers_pipelines import SCHED, load, reference  # noqa: E402
from test_diffusers_pipelines_families import PROMPTS, check_equal, latents, t5_text, t5_tokenizer, vae  # noqa: E402

from guidelab.errors import GuidelabError  # noqa: E402

SIZE = {"height": 16, "width": 24}  # VAE factor 1: latents [4, 16, 24]; h / w = 2 / 3


def micro_folder(tmp, sample_size=128, micro=True):
    """A PixArtAlphaPipeline folder; the size embedders need an inner width divisible by 3 (2 heads x 12)."""
    tok, vocab = t5_tokenizer(tmp / "t5tok")
    torch.manual_seed(0)
    net = diffusers.PixArtTransformer2DModel(
        sample_size=sample_size,
        num_layers=1,
        attention_head_dim=12,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        caption_channels=16,
        cross_attention_dim=24,
        use_additional_conditions=micro,
    )
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=tok,
        text_encoder=t5_text(vocab),
        vae=vae(1),
        transformer=net,
        scheduler=diffusers.DDIMScheduler.from_config({**SCHED, "clip_sample": False}),
    )
    out = tmp / f"micro-{sample_size}-{micro}"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return micro_folder(tmp_path_factory.mktemp("pixart-micro"))


def test_micro_conditioned_equals_diffusers(folder):
    pipe = load(folder)
    assert pipe.net.config.sample_size == 128 and pipe.net.use_additional_conditions
    assert pipe.size(SIZE["height"], SIZE["width"], binning=False) == (16, 24, None)
    L = latents((2, 4, 16, 24))
    args = (folder, "PixArtAlphaPipeline", PROMPTS)
    ref = reference(*args, 4.5, 3, L, use_resolution_binning=False, **SIZE)
    got = pipe.generate(PROMPTS, guider="cfg", w=4.5, steps=3, latents=L, resolution_binning=False, **SIZE)
    check_equal(got, ref, reference(*args, 1.0, 3, L, use_resolution_binning=False, **SIZE))
    assert got.shape == (2, 3, 16, 24)


def test_micro_conditions_are_the_sampled_size(folder):
    """The conditions are the sampled (height, width) and height / width, and they change the network's output."""
    pipe = load(folder)
    cond, null = pipe.encode(PROMPTS, None, size=(16, 24), guidance=None, reference=True)
    assert cond["resolution"].tolist() == [[16.0, 24.0]] * 2
    assert torch.allclose(cond["aspect_ratio"], torch.full((2, 1), 16 / 24))
    assert "resolution" not in null  # the reference branch keeps the call's micro-conditions (as diffusers)
    den = pipe.denoiser(null, (16, 24))
    x, sigma = latents((2, 4, 16, 24)), torch.full((2,), 2.0)
    with torch.no_grad():
        a = den(x, sigma, **cond)
        b = den(x, sigma, **{**cond, "resolution": cond["resolution"] * 2})
    assert (a - b).abs().max() > 1e-4


def test_missing_micro_conditions_refused(folder, tmp_path):
    pipe = load(folder)
    cond, null = pipe.encode(PROMPTS, None, size=(16, 24), guidance=None, reference=True)
    den = pipe.denoiser(null, (16, 24))
    x, sigma = latents((2, 4, 16, 24)), torch.full((2,), 2.0)
    for key in ("resolution", "aspect_ratio"):
        with pytest.raises(GuidelabError, match="micro-conditioned"):
            den(x, sigma, **{k: v for k, v in cond.items() if k != key})
    for key, bad in (
        ("resolution", cond["resolution"][:, :1]),
        ("aspect_ratio", cond["aspect_ratio"][:1]),
        ("resolution", [16, 24]),
    ):
        with pytest.raises(GuidelabError, match=f"micro-condition {key} must be a \\[batch"):
            den(x, sigma, **{**cond, key: bad})
    # micro-conditioned at another sample size: diffusers passes no micro-conditions there, guidelab refuses it
    other = load(micro_folder(tmp_path, sample_size=16))
    with pytest.raises(GuidelabError, match="micro-conditioned"):
        other.generate(PROMPTS[:1], guider="cfg", steps=2, resolution_binning=False, **SIZE)


def test_resolution_binning_flag(folder):
    """Binning on (the default) snaps 16 x 24 to the nearest 1024-px bin of ratio 2 / 3 and resizes back."""
    pipe = load(folder)
    h, w, orig = pipe.size(16, 24)
    assert orig == (16, 24) and abs(h / w - 2 / 3) < 0.1 and h * w > 500_000
    assert pipe.size(16, 24, binning=False) == (16, 24, None)
