"""Pipeline.encode's one ``encode_prompt`` call on ``prompts + [negative]`` equals diffusers' two calls (prompt
embeddings, then the negatives with ``do_classifier_free_guidance=True``) row for row, on every family; and
generate's images, made under ``torch.inference_mode``, are ordinary tensors the caller may edit in place."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_diffusers_pipelines import load, sd3_folder, sd_folder  # noqa: E402
from test_diffusers_pipelines_families import FLUX_SIZE, PROMPTS, flux_folder, pixart_folder, sdxl_folder  # noqa: E402

BUILD = {"sd": sd_folder, "sd3": sd3_folder, "sdxl": sdxl_folder, "pixart": pixart_folder, "flux": flux_folder}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("encode")
    return {k: load(build(tmp / k)) for k, build in BUILD.items()}


def two_calls(pipe, negative):
    """diffusers' own encoding as its pipeline call makes it: (cond, null) in guidelab's keys."""
    p, dev, neg = pipe.pipe, pipe.device, negative
    negs = None if neg is None else [neg] * len(PROMPTS)
    with torch.no_grad():
        if pipe.kind == "StableDiffusionPipeline":
            e, n = p.encode_prompt(PROMPTS, dev, 1, True, negative_prompt=negs)
            return {"encoder_hidden_states": e}, {"encoder_hidden_states": n}
        if pipe.kind == "StableDiffusion3Pipeline":
            e, n, pe, pn = p.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device=dev, negative_prompt=negs or [""] * 2)
            return {"encoder_hidden_states": e, "pooled_projections": pe}, {"encoder_hidden_states": n, "pooled_projections": pn}
        if pipe.kind == "StableDiffusionXLPipeline":
            e, n, pe, pn = p.encode_prompt(PROMPTS, None, dev, 1, True, negative_prompt=negs)
            return {"encoder_hidden_states": e, "text_embeds": pe}, {"encoder_hidden_states": n, "text_embeds": pn}
        if pipe.kind == "PixArtAlphaPipeline":
            e, m, n, nm = p.encode_prompt(PROMPTS, True, negative_prompt=neg or "", device=dev, clean_caption=True)
            return {"encoder_hidden_states": e, "encoder_attention_mask": m}, {
                "encoder_hidden_states": n,
                "encoder_attention_mask": nm,
            }
        e, pe, _ = p.encode_prompt(PROMPTS, PROMPTS, device=dev)
        n, pn, _ = p.encode_prompt(negs or [""] * 2, negs or [""] * 2, device=dev)  # FluxPipeline's true-CFG call
        return {"encoder_hidden_states": e, "pooled_projections": pe}, {"encoder_hidden_states": n, "pooled_projections": pn}


@pytest.mark.parametrize("negative", [None, "dark"])
@pytest.mark.parametrize("family", list(BUILD))
def test_one_call_equals_two(pipes, family, negative):
    pipe = pipes[family]
    guidance = 3.5 if family == "flux" else None
    cond, null = pipe.encode(list(PROMPTS), negative, size=(8, 8), guidance=guidance, reference=True)
    ref_cond, ref_null = two_calls(pipe, negative)
    for key, ref in ref_cond.items():
        assert cond[key].shape == ref.shape and (cond[key] - ref).abs().max() <= 1e-6, key
    for key, ref in ref_null.items():
        assert null[key].shape[0] == 1 and (null[key] - ref[:1]).abs().max() <= 1e-6, key
        assert bool((ref == ref[:1]).all())  # diffusers' N negative rows are one row repeated
    if family == "sdxl" and negative is None:  # force_zeros_for_empty_prompt: zeros, as diffusers
        assert not null["encoder_hidden_states"].any() and not null["text_embeds"].any()


def test_images_are_ordinary_tensors(pipes):
    images = pipes["sd"].generate(PROMPTS[:1], guider="cfg", steps=2)
    assert not images.is_inference()
    images.mul_(0.5)  # an inference tensor would refuse this outside inference mode
    flux = pipes["flux"].generate(PROMPTS[:1], negative_prompt="dark", guider="cfg", w=2.0, steps=2, **FLUX_SIZE)
    assert not flux.is_inference() and torch.isfinite(flux).all()
