"""EDM2 presets resolved against a local folder, and EDM2's SD-VAE latent standardisation."""

import pytest
import torch

from guidelab import guidance, schedules
from guidelab.errors import GuidelabError
from guidelab.models import edm2, edm2_presets
from guidelab.training import save_model
from guidelab.training.phema import load_network


def test_table_matches_the_published_presets():
    assert len(edm2.PRESETS) == 38  # edm2's 36 config_presets + the two guidance-interval ones
    p = edm2.PRESETS["edm2-img512-xxl-autog-fid"]
    assert (p.net, p.gnet, p.w, p.guider, p.value) == (
        "edm2-img512-xxl-0939524-0.075",
        "edm2-img512-m-0268435-0.155",
        2.05,
        "autoguidance",
        1.25,
    )
    p = edm2.PRESETS["edm2-img64-s-autog-fid"]
    assert (p.net, p.gnet, p.w, p.value, p.latent) == (
        "edm2-img64-s-1073741-0.045",
        "edm2-img64-xs-0134217-0.110",
        1.70,
        1.01,
        False,
    )
    p = edm2.PRESETS["edm2-img512-s-guid-dino"]
    assert (p.gnet, p.w, p.guider, p.metric, p.latent) == ("edm2-img512-xs-uncond-2147483-0.085", 1.90, "cfg", "fd_dinov2", True)
    assert edm2.PRESETS["edm2-img512-xxl-fid"].guider == "none" and edm2.PRESETS["edm2-img512-xxl-fid"].gnet is None
    assert edm2_presets.ema(p.net) == 0.085
    for q in edm2.PRESETS.values():  # guide and main share the training set: same resolution, EDM2's naming
        assert all(f.startswith(q.net[:11]) for f in q.files)
        assert q.guider != "cfg" or ("uncond" in q.gnet and "uncond" not in q.net)


def test_interval_presets_gate_the_official_steps():
    p = edm2.PRESETS["edm2-img512-xxl-interval-fid"]
    assert (p.interval_steps, p.w) == ((17, 22), 2.0)
    s = schedules.karras(32, 0.002, 80.0, 7.0)
    lo, hi = p.sigma_interval
    evals = [(i, s[i]) for i in range(32)] + [(i, s[i + 1]) for i in range(31)]  # Heun: 2 evaluations a step, 1 last
    official = {(i, float(v)) for i, v in evals if 17 <= i <= 22}
    ours = {(i, float(v)) for i, v in evals if lo < v <= hi}
    assert len(official) == 12 and len(official ^ ours) == 2  # a sigma gate differs only at the two boundaries
    assert hi == pytest.approx(1.6086, abs=1e-4)


def test_resolve_names_the_missing_file(tmp_path):
    with pytest.raises(GuidelabError, match="unknown EDM2 preset 'nope'"):
        edm2.resolve("nope", tmp_path)
    with pytest.raises(GuidelabError, match="needs edm2-img512-xxl-0939524-0.075.pkl"):
        edm2.resolve("edm2-img512-xxl-autog-fid", tmp_path)
    (tmp_path / "edm2-img512-xxl-0939524-0.075.pkl").write_bytes(b"")
    with pytest.raises(GuidelabError, match=r"needs edm2-img512-m-0268435-0\.155\.pkl \(or .*safetensors.*nvlabs-fi-cdn"):
        edm2.resolve("edm2-img512-xxl-autog-fid", tmp_path)
    (tmp_path / "edm2-img512-m-0268435-0.155.safetensors").write_bytes(b"")
    r = edm2.resolve("edm2-img512-xxl-autog-fid", tmp_path)
    assert (r.net.name, r.gnet.name) == ("edm2-img512-xxl-0939524-0.075.pkl", "edm2-img512-m-0268435-0.155.safetensors")
    with pytest.raises(GuidelabError, match="not a folder"):
        edm2.resolve("edm2-img512-xxl-fid", tmp_path / "nowhere")


def _net(label_dim, channels, seed, img_channels=4, gain_std=1.0):
    """A tiny random EDM2 (8x8, two levels) with random block gains, so its output is not trivial."""
    torch.manual_seed(seed)
    net = edm2.EDM2(
        img_resolution=8,
        img_channels=img_channels,
        label_dim=label_dim,
        use_fp16=False,
        model_channels=channels,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        channels_per_head=8,
        logvar_channels=8,
    )
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.copy_(torch.randn([]) * gain_std)
    return net.eval()


def test_interval_cfg_preset_on_local_networks(tmp_path):
    p = edm2.PRESETS["edm2-img512-xxl-interval-fid"]
    save_model(tmp_path / f"{p.net}.safetensors", _net(10, 16, 0))
    save_model(tmp_path / f"{p.gnet}.safetensors", _net(0, 8, 1))
    r = edm2.resolve(p.name, tmp_path)
    net, gnet = load_network(r.net), load_network(r.gnet)
    D = edm2.guided(p, net, gnet)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    lo, hi = p.sigma_interval
    inside, outside = torch.full((2,), 1.0), torch.full((2,), 10.0)
    want = gnet(x, inside).lerp(net(x, inside, class_labels=y), 2.0)
    torch.testing.assert_close(D(x, inside, class_labels=y), want, rtol=0, atol=1e-5)
    assert torch.equal(D(x, outside, class_labels=y), net(x, outside, class_labels=y))
    apg = guidance.apg(guidance.cfg(net, 2.0, uncond=gnet), eta=1.0)  # any other guider on the same pair
    torch.testing.assert_close(apg(x, inside, class_labels=y), want, rtol=0, atol=1e-5)  # eta = 1: CFG exactly
    auto = edm2.guided("edm2-img512-xxl-autog-fid", net, net, w=3.0)
    torch.testing.assert_close(
        auto(x, inside, class_labels=y), net(x, inside, class_labels=y), rtol=0, atol=1e-5
    )  # guide = main (two calls: w = 3 scales their rounding ~5x)


def test_latent_standardisation_constants():
    s = edm2.Standardization()
    scale, bias = s.scale_bias(torch.zeros(1))
    raw_mean, raw_std = torch.tensor([5.81, 3.25, 0.12, -2.15]), torch.tensor([4.17, 4.62, 3.71, 3.28])
    torch.testing.assert_close(scale.flatten(), 0.5 / raw_std)
    torch.testing.assert_close(bias.flatten(), -raw_mean * 0.5 / raw_std)
    raw = raw_mean[None, :, None, None] + raw_std[None, :, None, None] * torch.randn(256, 4, 4, 4)
    z = s.standardize(raw)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.full((4,), 0.5), rtol=0.05, atol=0)
    torch.testing.assert_close(s.unstandardize(z), raw, rtol=0, atol=1e-5)
    assert edm2.Standardization.of({"class_name": "StandardRGBEncoder"}) is None
    with pytest.raises(GuidelabError, match="unknown EDM2 encoder"):
        edm2.Standardization.of({"class_name": "Other"})


def test_vae_decode_from_a_local_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    )
    vae.save_pretrained(tmp_path / "vae")
    codec = edm2.VAELatents(edm2.load_vae(tmp_path / "vae"))
    z = torch.randn(3, 4, 8, 8) * 0.5
    img = codec.decode(z)
    scale = 0.5 / torch.tensor([4.17, 4.62, 3.71, 3.28])
    raw = (z - (-torch.tensor([5.81, 3.25, 0.12, -2.15]) * scale)[None, :, None, None]) / scale[None, :, None, None]
    with torch.no_grad():
        want = (vae.eval().decode(raw).sample.clamp(0, 1) * 255).to(torch.uint8)
    assert img.dtype == torch.uint8 and img.shape == (3, 3, 16, 16)
    assert (img.int() - want.int()).abs().max() <= 1
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        mean = vae.encode(pixels.float() / 255).latent_dist.mean
    torch.testing.assert_close(
        codec.encode(pixels),
        mean * scale[None, :, None, None] + (-torch.tensor([5.81, 3.25, 0.12, -2.15]) * scale)[None, :, None, None],
    )
    with pytest.raises(GuidelabError, match="not a diffusers AutoencoderKL folder"):
        edm2.load_vae(tmp_path)
