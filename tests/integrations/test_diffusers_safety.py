"""diffusers loading refuses pickles (safetensors only; ``.bin`` with an explicit ``allow_pickle=True`` and a
logged warning), ``guidelab diffusers`` is batch invariant on its raw samples (fixed blocks of rows), and its
``schedule="pipeline"`` equals the folder's scheduler loop."""

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
import test_diffusers as base  # tests/integrations is on sys.path (rootdir imports)
from diffusers import DDIMScheduler, UNet2DModel

from guidelab.app.diffusers_generate import generate
from guidelab.errors import GuidelabError
from guidelab.integrations import diffusers as gd
from guidelab.rng import SampleNoise

B, C, H = base.B, base.C, base.H


def _bin_folder(tmp_path):
    folder = tmp_path / "bin-only"
    base._unet(0).save_pretrained(folder, safe_serialization=False)
    DDIMScheduler(clip_sample=False).save_config(folder)
    assert [p.name for p in folder.glob("*.bin")] == ["diffusion_pytorch_model.bin"] and not list(folder.glob("*.safetensors"))
    return folder


def test_pickle_only_folder_is_refused_unless_allowed(tmp_path, caplog):
    """A folder holding only diffusion_pytorch_model.bin: one clear error naming the file and the opt-in, nothing
    written (generate with out=); allow_pickle=True loads it with a warning, equal to the safetensors copy."""
    folder = _bin_folder(tmp_path)
    with pytest.raises(GuidelabError, match=r"only pickled diffusion_pytorch_model\.bin .*allow_pickle=True"):
        gd.load(folder)
    out = tmp_path / "out"
    with pytest.raises(GuidelabError, match="allow_pickle"):
        generate(folder, steps=2, seeds=[0], label=1, out=out)
    assert not out.exists()
    with caplog.at_level(logging.WARNING, logger="guidelab"):
        den = gd.load(folder, allow_pickle=True, dtype=torch.float64)
    assert any("unpickling can run code" in r.getMessage() for r in caplog.records)
    safe = gd.load(base._save(tmp_path, "unet"), dtype=torch.float64)
    x, sigma = torch.randn(B, C, H, H, dtype=torch.float64), torch.full((B,), 2.0, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(den(x, sigma, class_labels=labels), safe(x, sigma, class_labels=labels))
    x0 = generate(folder, steps=2, seeds=[0], label=1, allow_pickle=True, block=0)
    assert x0.shape == (1, C, H, H)


def test_from_pretrained_is_told_safetensors_and_empty_folders_refused(tmp_path, monkeypatch):
    seen = {}
    orig = UNet2DModel.from_pretrained.__func__

    def spy(cls, *a, **kw):
        seen.update(kw)
        return orig(cls, *a, **kw)

    monkeypatch.setattr(UNet2DModel, "from_pretrained", classmethod(spy))
    gd.load(base._save(tmp_path, "unet"))
    assert seen["use_safetensors"] is True and seen["local_files_only"] is True
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((base._save(tmp_path, "unet") / "config.json").read_text())
    DDIMScheduler().save_config(empty)
    with pytest.raises(GuidelabError, match="no .safetensors weights"):
        gd.load(empty)


def test_raw_samples_are_bit_identical_at_any_batch(tmp_path):
    """samples.npz of seeds 0-7 at batch 1 and batch 8 (float32 network, a stochastic sampler, CFG: two branches in
    one call) are equal bit for bit, and seed 3 alone gives row 3 of them; with block=4 too."""
    folder = base._save(tmp_path, "text_unet")
    g = torch.Generator().manual_seed(0)
    emb, null = torch.randn(1, 4, 16, generator=g), torch.randn(1, 4, 16, generator=g)
    kw = dict(guider="cfg", w=2.0, sampler="euler_ancestral", steps=3, prompt_embeds=emb, null_text=null)
    arrays = []
    for batch, seeds, block in ((1, range(8), 64), (8, range(8), 64), (3, [3], 64), (1, range(8), 4), (8, range(8), 4)):
        out = tmp_path / f"b{batch}-{len(seeds)}-{block}"
        generate(folder, batch=batch, seeds=list(seeds), block=block, out=out, **kw)
        with np.load(out / "samples.npz") as f:
            arrays.append(f["x"])
    one, eight, alone, one4, eight4 = arrays
    assert one.dtype == np.float32 and np.array_equal(one, eight) and np.array_equal(alone[0], eight[3])
    assert np.array_equal(one4, eight4)
    assert np.abs(one4 - one).max() <= 1e-5 * np.abs(one).max()  # another block size: equal up to rounding


def test_schedule_pipeline_equals_the_ddim_scheduler_loop(tmp_path):
    """schedule="pipeline" with ddim: the folder's DDIM timesteps (leading spacing, steps_offset 1), the pipeline's
    unit-Gaussian start (the seed's latents), x0 clipping to [-1, 1] (clip_sample): equal to diffusers' DDIMScheduler
    loop from the same latents."""
    folder = tmp_path / "ddim"
    base._unet(0).save_pretrained(folder)
    DDIMScheduler(clip_sample=True, steps_offset=1, set_alpha_to_one=False).save_config(folder)
    seeds, steps = [4, 9], 6
    ours = generate(folder, sampler="ddim", schedule="pipeline", steps=steps, seeds=seeds, label=2, dtype="float64")
    model = gd.load(folder, dtype=torch.float64).model
    sched = DDIMScheduler.from_pretrained(folder, local_files_only=True)
    sched.set_timesteps(steps)
    lat = SampleNoise(seeds).randn([C, H, H], dtype=torch.float64)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model(lat, t, class_labels=torch.tensor([2, 2])).sample
            lat = sched.step(eps, t, lat).prev_sample
    final = float(((1 - sched.final_alpha_cumprod) / sched.final_alpha_cumprod).sqrt())
    assert final > 0 and (ours / (1 + final**2) ** 0.5 - lat).abs().max() < 1e-4
    karras = generate(folder, sampler="ddim", steps=steps, seeds=seeds, label=2, dtype="float64")
    assert (karras - ours).abs().max() > 1e-3


def test_block_settings_are_checked_before_anything_is_written(tmp_path):
    folder, out = base._save(tmp_path, "unet"), tmp_path / "out"
    for kw, match in (
        ({"seeds": [3, 3]}, "seeds must be distinct"),
        ({"seeds": [2**63 - 1], "block": 3}, "reaches past 2"),
        ({"block": -1}, "block must be an integer >= 0"),
    ):
        with pytest.raises(GuidelabError, match=match):
            generate(folder, steps=2, label=1, out=out, **kw)
        assert not out.exists()
    x = generate(folder, steps=2, seeds=[2**63 - 1], label=1, block=4)  # the last block ends at 2^63 - 1
    assert x.shape == (1, C, H, H) and torch.isfinite(x).all()
