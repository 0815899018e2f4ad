"""diffusers models as denoisers: equivalence with diffusers' own DDIM / Euler / DPM-Solver++ loops with CFG
(tiny randomly initialised models saved to and loaded from a temporary folder), loading errors, the
sigma <-> timestep map, and the attention-perturbation guiders (PAG, SEG, SLG).

The equivalence runs in float64 (the same float64 network on both sides) so that 1e-4 is a real bound:
untrained tiny models end far from data scale (|x| ~ 100), where float32 alone differs by ~2e-4."""

import functools
import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (
    DDIMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

from guidelab import guidance, samplers
from guidelab.app.diffusers_generate import generate
from guidelab.errors import GuidelabError
from guidelab.integrations import diffusers as gd

B, C, H = 2, 3, 8
NULL = 10  # null class id of the tiny class-conditional UNet


def _unet(seed):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=H,
        in_channels=C,
        out_channels=C,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=NULL + 1,
    )


def _text_unet(seed):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=H,
        in_channels=C,
        out_channels=C,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=8,
    )


def _dit(seed):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=C,
        out_channels=2 * C,
        num_layers=2,
        sample_size=H,
        patch_size=2,
        num_embeds_ada_norm=NULL,
    )


def _dit_legacy(seed):
    torch.manual_seed(seed)
    return Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=C,
        out_channels=2 * C,
        num_layers=2,
        sample_size=H,
        patch_size=2,
        num_embeds_ada_norm=NULL,
        norm_type="ada_norm_zero",
    )


MODELS = {"unet": _unet, "text_unet": _text_unet, "dit": _dit, "dit_legacy": _dit_legacy}


def _save(tmp_path, kind, prediction_type="epsilon", seed=0, name="model"):
    folder = tmp_path / f"{name}-{kind}-{prediction_type}"
    MODELS[kind](seed).save_pretrained(folder)
    DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False).save_config(folder)
    return folder


def _cond(kind, gen):
    if kind == "text_unet":
        return {"encoder_hidden_states": torch.randn(B, 4, 16, generator=gen, dtype=torch.float64)}
    return {"class_labels": torch.tensor([1, 7])}


def _null(kind, cond):
    if kind == "text_unet":
        return {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}
    return {"class_labels": torch.full((B,), NULL)}


def _guided_output(model, kind, prediction_type, x_in, t, cond, w):
    """diffusers' way: two separate passes, ``out_u + w (out_c - out_u)`` on the model output."""
    t = torch.as_tensor(t).expand(x_in.shape[0])  # DiT needs a [B] timestep
    out_c = model(x_in, timestep=t, **cond).sample[:, :C]
    out_u = model(x_in, timestep=t, **_null(kind, cond)).sample[:, :C]
    return out_u + w * (out_c - out_u)


def _denoiser(folder, kind):
    den = gd.load(
        folder,
        dtype=torch.float64,
        null_text=torch.zeros(1, 4, 16) if kind == "text_unet" else None,
        null_label=NULL if kind == "unet" else None,
    )
    return den, guidance.cfg(den, 2.5)


@pytest.mark.parametrize(
    "kind,prediction_type",
    [("unet", "epsilon"), ("text_unet", "v_prediction"), ("dit", "epsilon"), ("unet", "sample"), ("dit_legacy", "epsilon")],
)
def test_ddim_cfg_equals_diffusers_loop(tmp_path, kind, prediction_type):
    folder = _save(tmp_path, kind, prediction_type)
    den, guided = _denoiser(folder, kind)
    model = den.model
    sched = DDIMScheduler.from_pretrained(folder, local_files_only=True)
    sched.set_timesteps(8)
    gen = torch.Generator().manual_seed(0)
    cond = _cond(kind, gen)
    sigmas = den.sigmas(8, "leading")
    assert torch.equal(torch.as_tensor(den.timestep(sigmas[:-1]).round().long()), sched.timesteps.long())
    x_vp = torch.randn(B, C, H, H, generator=gen, dtype=torch.float64)
    ref = x_vp.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = _guided_output(model, kind, prediction_type, ref, t, cond, 2.5)
            ref = sched.step(out, t, ref).prev_sample
    x = x_vp * (1 + sigmas[0] ** 2).sqrt()
    ours = samplers.ddim(guided, x, sigmas, cond=cond)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    assert (ours - samplers.ddim(den, x, sigmas, cond=cond)).abs().max() > 1e-2  # guidance matters


@pytest.mark.parametrize("kind,prediction_type", [("unet", "epsilon"), ("text_unet", "v_prediction"), ("dit", "epsilon")])
def test_euler_cfg_equals_euler_discrete_scheduler(tmp_path, kind, prediction_type):
    """EulerDiscreteScheduler works in EDM space (sample scaled by 1/sqrt(1 + sigma^2) at the model input)
    on ``sigmas = interp(timesteps, grid)`` (linear in sigma); with "leading" spacing the timesteps are
    integers, so its sigmas are grid sigmas -- ours on the same grid (checked) and we feed its very sigmas."""
    folder = _save(tmp_path, kind, prediction_type)
    den, guided = _denoiser(folder, kind)
    sched = EulerDiscreteScheduler.from_pretrained(folder, local_files_only=True)
    sched.set_timesteps(10)
    spacing = sched.config.timestep_spacing  # "leading", from the saved DDIM config
    assert torch.allclose(sched.sigmas.double(), den.sigmas(10, spacing), rtol=1e-6)
    gen = torch.Generator().manual_seed(1)
    cond = _cond(kind, gen)
    x = torch.randn(B, C, H, H, generator=gen, dtype=torch.float64) * sched.sigmas[0]
    ref = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = _guided_output(den.model, kind, prediction_type, sched.scale_model_input(ref, t), t, cond, 2.5)
            ref = sched.step(out, t, ref).prev_sample
    ours = samplers.euler(guided, x, sched.sigmas.clone(), cond=cond)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()


@pytest.mark.parametrize("kind,prediction_type", [("unet", "epsilon"), ("text_unet", "v_prediction"), ("dit", "epsilon")])
def test_dpmpp_2m_cfg_equals_dpm_solver_multistep(tmp_path, kind, prediction_type):
    """DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint) in VP space on its own sigmas; at >= 15
    steps only its last step (to sigma = 0, ``final_sigmas_type="zero"``) is first order, as in ours."""
    folder = _save(tmp_path, kind, prediction_type)
    den, guided = _denoiser(folder, kind)
    sched = DPMSolverMultistepScheduler.from_pretrained(folder, local_files_only=True)
    sched.set_timesteps(15)
    sigmas = sched.sigmas.clone()
    assert float(sigmas[-1]) == 0 and len(sigmas) == 16
    assert torch.equal(den.timestep(sigmas[:-1]).round().long(), sched.timesteps.long())
    gen = torch.Generator().manual_seed(2)
    cond = _cond(kind, gen)
    x_vp = torch.randn(B, C, H, H, generator=gen, dtype=torch.float64)
    ref = x_vp.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            ref = sched.step(_guided_output(den.model, kind, prediction_type, ref, t, cond, 2.5), t, ref).prev_sample
    x = x_vp * (1 + sigmas[0].double() ** 2).sqrt()
    ours = samplers.dpmpp_2m(guided, x, sigmas, cond=cond)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    assert (ours - samplers.euler(guided, x, sigmas, cond=cond)).abs().max() > 1e-3  # the 2nd order matters


# ---------------------------------------------------------------------------------------------
# Loading, timesteps, prediction types.


def test_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(GuidelabError, match="does not exist .*nothing is downloaded"):
        gd.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GuidelabError, match="no config.json"):
        gd.load(tmp_path / "empty")
    folder = tmp_path / "noschedule"
    _unet(0).save_pretrained(folder)
    with pytest.raises(GuidelabError, match="no scheduler_config.json"):
        gd.load(folder)


def test_pipeline_layout_and_snapped_timesteps(tmp_path):
    """A pipeline folder (model_index.json, unet/, scheduler/) loads; between grid sigmas "interpolate" gives
    the fractional t linear in log sigma, "nearest" the nearest grid t; on the grid both give t exactly."""
    _unet(0).save_pretrained(tmp_path / "unet")
    DDIMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    den = gd.load(tmp_path, null_label=NULL)
    assert den.prediction_type == "v_prediction" and den.condition.key == "class_labels" and den.null_label == NULL
    g = den.grid
    mid = (g[[100, 500]].log() * 0.7 + g[[101, 501]].log() * 0.3).exp()
    assert torch.allclose(den.timestep(mid), torch.tensor([100.3, 500.3], dtype=torch.float64), atol=1e-9)
    assert torch.equal(den.timestep(g[[0, 7, 999]]), torch.tensor([0.0, 7.0, 999.0], dtype=torch.float64))
    snapped = gd.load(tmp_path, null_label=NULL, timesteps="nearest")
    assert torch.equal(snapped.timestep(mid), torch.tensor([100.0, 500.0], dtype=torch.float64))
    assert torch.equal(den.timestep(torch.tensor([1e-6, 1e6])), torch.tensor([0.0, 999.0], dtype=torch.float64))
    with pytest.raises(GuidelabError, match="timesteps must be one of"):
        gd.load(tmp_path, timesteps="round")


@pytest.mark.parametrize("mode", ["interpolate", "nearest"])
def test_timestep_cache_is_bit_identical(tmp_path, mode):
    """The per-sigma cache of DiffusersDenoiser.timestep returns what the uncached map computes, bit for bit, on
    grid and off-grid sigmas, repeated and mixed in one batch, in float32 and float64; NaN bypasses it."""
    den = gd.load(_save(tmp_path, "unet"), timesteps=mode)
    gen = torch.Generator().manual_seed(0)
    s = torch.cat([den.grid[[0, 3, 999]], torch.rand(5, generator=gen, dtype=torch.float64) * 50, torch.tensor([0.0, 1e9])])
    for sigma in (s, s.float(), s.flip(0), s[[1, 1, 4, 1]]):
        first, again = den.timestep(sigma), den.timestep(sigma)
        want = den._timestep(sigma)
        assert first.dtype == torch.float64 and torch.equal(first, want) and torch.equal(again, want)
    assert 0 < len(den._t_cache) <= 4096
    nan = torch.tensor([float("nan"), 1.0])
    assert torch.equal(den.timestep(nan)[1:], den._timestep(nan)[1:])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_convert_to_x0(tmp_path, prediction_type):
    """D from the raw output F at a grid timestep, by the VP formulas written in VP variables."""
    den = gd.load(_save(tmp_path, "unet", prediction_type), dtype=torch.float64)
    t = 400
    abar = 1 / (1 + den.grid[t] ** 2)
    x = torch.randn(B, C, H, H, dtype=torch.float64) * den.grid[t]
    x_vp = x * abar.sqrt()
    labels = torch.tensor([2, 3])
    with torch.no_grad():
        F_ = den.model(x_vp, torch.full((B,), float(t)), class_labels=labels).sample
        D = den(x, den.grid[t].expand(B), class_labels=labels)
    x0 = {
        "epsilon": (x_vp - (1 - abar).sqrt() * F_) / abar.sqrt(),
        "v_prediction": abar.sqrt() * x_vp - (1 - abar).sqrt() * F_,
        "sample": F_,
    }[prediction_type]
    assert torch.allclose(D, x0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Attention perturbation.


def _count_calls(model):
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    return calls


def test_attention_hooks_on_a_single_layer():
    """PAG: softmax(QK^T)V -> V; SEG at infinite blur: every query replaced by the mean query; a tiny blur is
    no blur; only the marked rows change."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).double()
    h = torch.randn(3, 16, 16, dtype=torch.float64)  # [B, L = 4 x 4 tokens, dim]
    mask = torch.tensor([False, True, True])
    with torch.no_grad():
        plain = attn(h)
        with gd.perturbed_attention(attn, gd.Perturbation("pag", "all"), mask):
            pag = attn(h)
        identity = attn.to_out[0](attn.to_v(h))
        with gd.perturbed_attention(attn, gd.Perturbation("seg", "all"), mask):
            seg = attn(h)
        q, k, v = (f(h).view(3, 16, 2, 8).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        uniform = torch.softmax(q.mean(2, keepdim=True) @ k.transpose(-1, -2) / 8**0.5, -1) @ v
        uniform = attn.to_out[0](uniform.expand(-1, -1, 16, -1).transpose(1, 2).reshape(3, 16, 16))
        with gd.perturbed_attention(attn, gd.Perturbation("seg", "all", blur_sigma=0.05), mask):
            seg_tiny = attn(h)
    assert torch.equal(pag[0], plain[0]) and torch.allclose(pag[1:], identity[1:], atol=1e-12)
    assert torch.equal(seg[0], plain[0]) and torch.allclose(seg[1:], uniform[1:], atol=1e-12)
    assert torch.allclose(seg_tiny, plain, atol=1e-12)
    assert (pag[1:] - plain[1:]).abs().max() > 1e-2 and (seg[1:] - plain[1:]).abs().max() > 1e-2
    with torch.no_grad():
        assert torch.equal(attn(h), plain)  # hooks and the patched attention are gone


@pytest.mark.parametrize("mode", ["pag", "seg"])
def test_attention_hooks_on_scattered_rows_with_an_attention_mask(mode):
    """Marks [T, F, T, F] (four runs) with a per-row attention bias: every row equals that row run alone,
    perturbed or not, so batch-sized arguments of the attention are sliced with the rows."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(1)
    attn = Attention(query_dim=16, heads=2, dim_head=8).double()
    h = torch.randn(4, 16, 16, dtype=torch.float64)
    bias = torch.zeros(4, 1, 16, dtype=torch.float64)
    bias[:, :, 8:] = torch.tensor([0.0, -1e4, -3.0, -1e4], dtype=torch.float64)[:, None, None]  # rows differ
    marks = torch.tensor([True, False, True, False])
    pert = gd.Perturbation(mode, "all", blur_sigma=1.0)
    with torch.no_grad():
        with gd.perturbed_attention(attn, pert, marks):
            out = attn(h, attention_mask=bias)
        for i in range(4):
            with gd.perturbed_attention(attn, pert, marks[i : i + 1]):
                alone = attn(h[i : i + 1], attention_mask=bias[i : i + 1])
            assert torch.allclose(out[i : i + 1], alone, atol=1e-12), i
        plain = attn(h, attention_mask=bias)
    assert torch.allclose(out[1::2], plain[1::2], atol=1e-12) and (out[::2] - plain[::2]).abs().max() > 1e-2


def test_slg_skips_the_selected_blocks(tmp_path):
    den = gd.load(_save(tmp_path, "unet"), dtype=torch.float64)
    pert = gd.Perturbation("slg", layers=["mid_block"])
    mods = pert.modules(den.model)
    assert [n for n, _ in mods] == ["mid_block.attentions.0"]
    with pytest.raises(GuidelabError, match="no layer of UNet2DModel matches"):
        gd.Perturbation("pag", layers=["no_such_layer"]).modules(den.model)
    with pytest.raises(GuidelabError, match="mode must be"):
        gd.Perturbation("bogus")
    x = torch.randn(B, C, H, H, dtype=torch.float64) * 3
    sigma = torch.full((B,), 3.0, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        skipped = den.with_perturbation(pert)(x, sigma, class_labels=labels, perturb=torch.tensor([True, False]))
        plain = den(x, sigma, class_labels=labels)
        mods[0][1].forward = lambda hidden_states, *a, **k: hidden_states  # the block removed by hand
        removed = den(x, sigma, class_labels=labels)
    assert torch.allclose(skipped[0], removed[0], atol=1e-12) and torch.equal(skipped[1], plain[1])
    assert (skipped[0] - plain[0]).abs().max() > 1e-4


@pytest.mark.parametrize("mode,kind", [("pag", "unet"), ("seg", "dit"), ("slg", "dit"), ("pag", "text_unet")])
def test_perturbation_guiders_batched_equal_separate_passes(tmp_path, mode, kind):
    """One call of 2B rows per step (batched) or two calls of B rows (separate): the same samples; w = 1
    is the unguided sampler with one B-row call per step."""
    den = gd.load(_save(tmp_path, kind), dtype=torch.float64, null_label=NULL if kind == "unet" else None)
    calls = _count_calls(den.model)
    cond = _cond(kind, torch.Generator().manual_seed(4))
    sigmas = den.sigmas(5, "trailing")
    x = torch.randn(B, C, H, H, dtype=torch.float64) * sigmas[0]
    guider = functools.partial(getattr(gd, mode), layers="all")  # every candidate layer of the 2-block DiT
    batched = samplers.euler(guider(den, 3.0), x, sigmas, cond=cond)
    assert calls == [2 * B] * 5
    calls.clear()
    separate = samplers.euler(guider(den, 3.0, batched=False), x, sigmas, cond=cond)
    assert calls == [B] * 10
    assert torch.allclose(batched, separate, atol=1e-8)
    calls.clear()
    plain = samplers.euler(den, x, sigmas, cond=cond)
    assert torch.equal(samplers.euler(guider(den, 1.0), x, sigmas, cond=cond), plain) and calls == [B] * 10
    assert (batched - plain).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# generate().


def test_generate_seeds_batches_guiders_and_files(tmp_path):
    """Per-sample seeds: batch 1 and batch 3 give the same samples; autoguidance with a second diffusers
    model equals the guider built by hand; PNGs and the npz are written."""
    main, guide = _save(tmp_path, "unet", seed=0), _save(tmp_path, "unet", seed=1, name="guide")
    kw = {"sampler": "dpmpp_2m_sde", "steps": 4, "seeds": [5, 6, 7], "label": 3, "dtype": torch.float64, "block": 4}
    a = generate(main, guider="autoguidance", w=2.0, guide=guide, batch=1, out=tmp_path / "a", **kw)
    b = generate(main, guider="autoguidance", w=2.0, guide=guide, batch=3, **kw)
    assert torch.allclose(a, b, atol=1e-10)
    den, g = gd.load(main, dtype=torch.float64), gd.load(guide, dtype=torch.float64)
    from guidelab.rng import SampleNoise

    noise = SampleNoise([5, 6, 7])
    sigmas = gd.make_sigmas(den, 4)
    x = noise.randn([C, H, H], dtype=torch.float64) * sigmas[0]
    ref = samplers.dpmpp_2m_sde(
        guidance.autoguidance(den, g, 2.0), x, sigmas, cond={"class_labels": torch.full((3,), 3)}, noise=noise
    )
    assert torch.allclose(a, ref, atol=1e-10)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000000005.png", "000000006.png", "000000007.png", "samples.npz"]
    import numpy as np

    with np.load(tmp_path / "a" / "samples.npz") as f:
        assert np.allclose(f["x"], a.numpy(), atol=1e-6) and f["seeds"].tolist() == [5, 6, 7]
    for guider in ["cfg", "pag", "seg", "slg"]:  # slg: every step (its default window holds none of 4)
        y = generate(main, guider=guider, w=2.0, null_label=NULL, interval=(0, math.inf) if guider == "slg" else None, **kw)
        assert y.shape == a.shape and torch.isfinite(y).all()
    with pytest.raises(GuidelabError, match="autoguidance needs --guide"):
        generate(main, guider="autoguidance", w=2.0, **kw)
    with pytest.raises(GuidelabError, match=r"cfg needs a class-conditional network \(its null label\)"):
        generate(main, guider="cfg", w=2.0, **kw)


def test_cli_diffusers_text_model_with_cfg(tmp_path, monkeypatch, capsys):
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from guidelab.app import cli

    folder = _save(tmp_path, "text_unet")
    emb = tmp_path / "emb.safetensors"
    save_file({"prompt_embeds": torch.randn(1, 4, 16), "null_embeds": torch.zeros(1, 4, 16)}, str(emb))
    out = tmp_path / "out"
    args = [
        "diffusers",
        str(folder),
        "--out",
        str(out),
        "--guider",
        "cfg",
        "--weight",
        "3",
        "--sampler",
        "heun",
        "--steps",
        "3",
        "--seeds",
        "4-6",
        "--batch",
        "2",
        "--prompt-embeds",
        str(emb),
        "--interval",
        "0.5-50",
    ]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["000000004.png", "000000005.png", "000000006.png", "samples.npz"]
    monkeypatch.setattr("sys.argv", ["guidelab", "diffusers", str(tmp_path / "missing"), "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        cli.run()
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_euler_karras_sigmas_fractional_timesteps_match(tmp_path):
    """Off the grid: EulerDiscreteScheduler(use_karras_sigmas=True) feeds fractional timesteps from its
    log-sigma interpolation, which is our "interpolate" map; the samples agree (float64, 1e-4)."""
    folder = _save(tmp_path, "unet")
    den, guided = _denoiser(folder, "unet")
    sched = EulerDiscreteScheduler.from_pretrained(folder, local_files_only=True, use_karras_sigmas=True)
    sched.set_timesteps(6)
    frac = sched.timesteps - sched.timesteps.round()
    assert frac.abs().max() > 0.05  # really off the grid
    assert torch.allclose(den.timestep(sched.sigmas[:-1].double()), sched.timesteps.double(), atol=1e-3)
    gen = torch.Generator().manual_seed(6)
    cond = _cond("unet", gen)
    x = torch.randn(B, C, H, H, generator=gen, dtype=torch.float64) * sched.sigmas[0]
    ref = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = _guided_output(den.model, "unet", "epsilon", sched.scale_model_input(ref, t), t, cond, 2.5)
            ref = sched.step(out, t, ref).prev_sample
    ours = samplers.euler(guided, x, sched.sigmas.clone(), cond=cond)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()


def test_generate_half_precision_model_keeps_a_float32_sampler(tmp_path):
    folder = _save(tmp_path, "dit")
    kw = {"sampler": "euler", "steps": 4, "seeds": [1, 2], "label": 4}
    full = generate(folder, **kw)
    half = generate(folder, dtype=torch.bfloat16, **kw)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - full).norm() < 0.05 * full.norm()  # bfloat16 network, same trajectory
