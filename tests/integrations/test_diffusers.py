"""diffusers models as denoisers: equivalence with diffusers' own DDIM / Euler / DPM-Solver++ loops with CFG
(tiny randomly initialised models saved to and loaded from a temporary folder), loading errors, the
sigma <-> timestep map, and the attention-perturbation guiders (PAG, SEG, SLG).

The equivalence runs in float64 (the same float64 network on both sides) so that 1e-4 is a real bound:
untrained tiny models end far from data scale (|x| ~ 100), where float32 alone differs by ~2e-4."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerDiscreteScheduler, UNet2DConditionModel, UNet2DModel)

from guidelab import guidance, samplers  # noqa: E402
from guidelab.errors import GuidelabError  # noqa: E402
from guidelab.integrations import diffusers as gd  # noqa: E402

B, C, H = 2, 3, 8
NULL = 10                                                     # null class id of the tiny class-conditional UNet


def _unet(seed):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=H, in_channels=C, out_channels=C, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, num_class_embeds=NULL + 1)


def _text_unet(seed):
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=H, in_channels=C, out_channels=C, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                cross_attention_dim=16, attention_head_dim=8)


def _dit(seed):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=2 * C,
                                 num_layers=2, sample_size=H, patch_size=2, num_embeds_ada_norm=NULL)


MODELS = {"unet": _unet, "text_unet": _text_unet, "dit": _dit}


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
    t = torch.as_tensor(t).expand(x_in.shape[0])               # DiT needs a [B] timestep
    out_c = model(x_in, t, **cond).sample[:, :C]
    out_u = model(x_in, t, **_null(kind, cond)).sample[:, :C]
    return out_u + w * (out_c - out_u)


def _denoiser(folder, kind):
    den = gd.load(folder, dtype=torch.float64, null_text=torch.zeros(1, 4, 16) if kind == "text_unet" else None,
                  null_class=NULL if kind == "unet" else None)
    return den, guidance.cfg(den, 2.5, key=den.cfg_key)


@pytest.mark.parametrize("kind,prediction_type", [("unet", "epsilon"), ("text_unet", "v_prediction"),
                                                  ("dit", "epsilon"), ("unet", "sample")])
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
    assert (ours - samplers.ddim(den, x, sigmas, cond=cond)).abs().max() > 1e-2   # guidance matters


@pytest.mark.parametrize("kind,prediction_type", [("unet", "epsilon"), ("text_unet", "v_prediction"), ("dit", "epsilon")])
def test_euler_cfg_equals_euler_discrete_scheduler(tmp_path, kind, prediction_type):
    """EulerDiscreteScheduler works in EDM space (sample scaled by 1/sqrt(1 + sigma^2) at the model input)
    on ``sigmas = interp(timesteps, grid)`` (linear in sigma); with "leading" spacing the timesteps are
    integers, so its sigmas are grid sigmas -- ours on the same grid (checked) and we feed its very sigmas."""
    folder = _save(tmp_path, kind, prediction_type)
    den, guided = _denoiser(folder, kind)
    sched = EulerDiscreteScheduler.from_pretrained(folder, local_files_only=True)
    sched.set_timesteps(10)
    spacing = sched.config.timestep_spacing                    # "leading", from the saved DDIM config
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
    assert (ours - samplers.euler(guided, x, sigmas, cond=cond)).abs().max() > 1e-3   # the 2nd order matters
