"""Guide a diffusers model with guidelab: classifier-free guidance, perturbed-attention guidance (PAG) and
both in one batched call (PAG + CFG, as diffusers' PAG pipelines do), each sampled with EDM Heun from the
same per-sample noise.

    python examples/guide_diffusers.py                    # a tiny random class-conditional UNet2DModel
    python examples/guide_diffusers.py --model FOLDER     # a local diffusers folder (model + scheduler config)

Without ``--model`` a tiny random ``UNet2DModel`` (8x8, 3 channels, 10 classes + a null class) is built in a
temporary folder: the numbers show the machinery, not image quality. Needs the ``diffusers`` extra
(``pip install guidelab[diffusers]``). ``--out DIR`` writes one PNG grid per guider.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from guidelab import guidance, rng, samplers

NULL = 10  # the tiny model's null class


def tiny_unet_folder(folder: str | Path) -> Path:
    """A random class-conditional diffusers UNet2DModel and its DDIM scheduler config, saved in ``folder``."""
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=NULL + 1,
    )
    folder = Path(folder)
    unet.save_pretrained(folder)  # safetensors weights
    DDIMScheduler(num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False).save_config(folder)
    return folder


def main(argv=None) -> dict[str, dict]:
    """Returns ``{guider: {"samples": tensor, "change": mean |x - x_unguided|}}``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a local diffusers folder (default: a tiny random UNet)")
    ap.add_argument("--null-label", type=int, default=None, help="the model's null class (default: 10 for the tiny UNet)")
    ap.add_argument("--label", type=int, default=3, help="class label of every sample")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=3.0, help="CFG weight (1 = none)")
    ap.add_argument("--pag", type=float, default=2.0, help="PAG weight (1 = none; diffusers' pag_scale = w - 1)")
    ap.add_argument("--quick", action="store_true", help="2 samples, 4 steps")
    ap.add_argument("--out", default=None, help="write one PNG grid per guider here")
    a = ap.parse_args(argv)
    import guidelab.integrations.diffusers as gd  # needs diffusers

    n, steps = (2, 4) if a.quick else (a.samples, a.steps)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.model) if a.model else tiny_unet_folder(Path(tmp) / "tiny-unet")
        den = gd.load(folder, null_label=a.null_label if a.model else NULL)
        sigmas = gd.make_sigmas(den, steps)
        layers = "all" if not a.model else None  # the tiny UNet lacks diffusers' default PAG blocks
        guiders = {
            "none": den,
            "cfg": guidance.cfg(den, a.cfg),
            "pag": gd.pag(den, a.pag, layers=layers),
            "pag+cfg": gd.pag(den, a.pag, layers=layers, cfg_weight=a.cfg),
        }
        shape = (den.model.config.in_channels, den.model.config.sample_size, den.model.config.sample_size)
        cond = {"class_labels": torch.full((n,), a.label)}
        result: dict[str, dict] = {}
        for name, D in guiders.items():
            x = rng.SampleNoise(torch.arange(n)).randn(shape) * sigmas[0]  # the same noise for every guider
            with torch.no_grad():
                x = samplers.heun(D, x, sigmas, cond=cond)
            change = float((x - result["none"]["samples"]).abs().mean()) if result else 0.0
            result[name] = {"samples": x, "change": change}
            print(f"{name:8s} mean |x| {x.abs().mean():.4f}  mean |x - unguided| {change:.4f}")
    if a.out:
        from guidelab._io import atomic_write, class_grid, png_bytes

        Path(a.out).mkdir(parents=True, exist_ok=True)
        for name, r in result.items():
            grid = class_grid(r["samples"].clamp(-1, 1), None, list(range(n)), per_row=n)
            atomic_write(Path(a.out) / f"{name}.png", png_bytes(grid))
    return result


if __name__ == "__main__":
    main()
