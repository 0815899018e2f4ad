"""The folder's scheduler config honoured: schedule "pipeline" + the scheduler's x0 treatment + its sampler equal
diffusers' own scheduler loop on a tiny UNet (clip_sample, thresholding, steps_offset, set_alpha_to_one,
timestep_spacing, use_karras_sigmas, final_sigmas_type); unsupported settings refused."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from guidelab.errors import GuidelabError  # noqa: E402
from guidelab.integrations.diffusers import DiffusersDenoiser  # noqa: E402
from guidelab.integrations.diffusers import scheduler as sch  # noqa: E402

BASE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def reference(unet, config, steps, latents):
    """diffusers: the scheduler's own loop (x_VP)."""
    s = getattr(diffusers, config["_class_name"]).from_config({k: v for k, v in config.items() if k[0] != "_"})
    s.set_timesteps(steps)
    x = latents * s.init_noise_sigma
    for t in s.timesteps:
        out = unet(s.scale_model_input(x, t), t, return_dict=False)[0]
        x = s.step(out, t, x, return_dict=False)[0]
    return x


def ours(unet, config, steps, latents):
    den = DiffusersDenoiser(unet, config)
    sig = sch.pipeline_sigmas(den, steps)
    final = sch.final_sigma(den)
    x = sch.start(den, sig, latents.double())
    x = sch.sample(sch.default_sampler(config), sch.x0_wrapper(den), x, sig, final=final)
    return (x / (1 + final**2) ** 0.5).float(), final


CASES = [
    {"_class_name": "DDIMScheduler", "clip_sample": True, "set_alpha_to_one": False, "steps_offset": 1},
    {"_class_name": "DDIMScheduler", "clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "leading"},
    {"_class_name": "DDIMScheduler", "thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
    {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading", "steps_offset": 1},
    {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "final_sigmas_type": "zero"},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k[0] != "_")[:60])
def test_equals_scheduler_loop(unet, case):
    config = {**BASE, **case}
    torch.manual_seed(1)
    latents = torch.randn(2, 3, 8, 8)
    if case["_class_name"] == "DDIMScheduler":
        latents = latents * 3  # x0 large enough that clipping / thresholding bites
    with torch.no_grad():
        ref = reference(unet, config, 10, latents)
        got, final = ours(unet, config, 10, latents)
    assert (got - ref).abs().max() < 1e-4
    assert (final > 0) == (case.get("set_alpha_to_one") is False)


def test_clipping_takes_effect(unet):
    """Without the wrapper the clip_sample=True run differs: the setting is not ignored."""
    config = {**BASE, **CASES[0]}
    torch.manual_seed(1)
    latents = torch.randn(2, 3, 8, 8) * 3
    with torch.no_grad():
        ref = reference(unet, config, 10, latents)
        den = DiffusersDenoiser(unet, config)
        sig = sch.pipeline_sigmas(den, 10)
        x = latents.double() * (1 + sig[0] ** 2).sqrt()
        raw = sch.sample("ddim", den, x, sig, final=sch.final_sigma(den)) / (1 + sch.final_sigma(den) ** 2) ** 0.5
    assert (raw.float() - ref).abs().max() > 1e-3


@pytest.mark.parametrize(
    "case,match",
    [
        ({"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True}, "zero terminal SNR"),
        ({"_class_name": "EulerDiscreteScheduler", "use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, "solver_order 2"),
        ({"_class_name": "UniPCMultistepScheduler"}, "not supported; allowed"),
    ],
)
def test_refused(case, match):
    with pytest.raises(GuidelabError, match=match):
        sch.check_config({**BASE, **case})


def test_default_sampler_follows_class():
    assert sch.default_sampler({"_class_name": "DDIMScheduler"}) == "ddim"
    assert sch.default_sampler({"_class_name": "FlowMatchEulerDiscreteScheduler"}) == "euler"
