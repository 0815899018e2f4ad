"""Guided sampling of one diffusers UNet: guidelab (CFG branches in one batched call) against diffusers'
DDIM loop with separate conditional / unconditional passes (and, for reference, diffusers' loop with the
two branches concatenated, as its classic pipelines do).

A randomly initialised class-conditional UNet2DModel (saved to and loaded from a temporary folder), DDIM,
same timesteps, CFG weight 3. Times are medians over rounds (rounds alternate the three loops). Checks that
guidelab's samples equal the separate-pass loop's. Usage:
    python bench/diffusers_guided.py [--batches 1,4,16] [--steps 10] [--size 32] [--width 64] [--rounds 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from diffusers import DDIMScheduler, UNet2DModel

from guidelab import guidance, samplers
from guidelab.integrations import diffusers as gd

NULL = 10


def build(folder, size, width):
    torch.manual_seed(0)
    UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(width, 2 * width, 2 * width),
                layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=min(32, width),
                attention_head_dim=min(32, width), num_class_embeds=NULL + 1).save_pretrained(folder)
    DDIMScheduler(clip_sample=False).save_config(folder)


@torch.no_grad()
def diffusers_loop(model, sched, x_vp, labels, w, separate):
    null = torch.full_like(labels, NULL)
    x = x_vp
    for t in sched.timesteps:
        if separate:
            c = model(x, t, class_labels=labels).sample
            u = model(x, t, class_labels=null).sample
        else:
            u, c = model(torch.cat([x, x]), t, class_labels=torch.cat([null, labels])).sample.chunk(2)
        x = sched.step(u + w * (c - u), t, x).prev_sample
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=int, default=64, help="channels of the first UNet level (then 2x, 2x)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    ap.add_argument("--w", type=float, default=3.0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"load average {os.getloadavg()}, cores {os.cpu_count()}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, a.size, a.width)
        den = gd.load(tmp, null_class=NULL)
        sched = DDIMScheduler.from_pretrained(tmp, local_files_only=True)
        sched.set_timesteps(a.steps)
        sigmas = den.sigmas(a.steps, sched.config.timestep_spacing).float()
        guided = guidance.cfg(den, a.w, key="class_labels")
        print(f"UNet2DModel {sum(p.numel() for p in den.model.parameters()) / 1e6:.1f} M params, "
              f"{a.size}x{a.size}, DDIM {a.steps} steps, cfg w={a.w}")
        print("| batch | guidelab (batched branches) | diffusers, separate passes | diffusers, cat batch | "
              "speed-up vs separate | max abs diff |")
        print("|---|---|---|---|---|---|")
        for B in [int(b) for b in a.batches.split(",")]:
            g = torch.Generator().manual_seed(B)
            x_vp = torch.randn(B, 3, a.size, a.size, generator=g)
            labels = torch.randint(NULL, (B,), generator=g)
            x = x_vp * (1 + sigmas[0] ** 2).sqrt()
            runs = {"guidelab": lambda x=x, y=labels: samplers.ddim(guided, x, sigmas, cond={"class_labels": y}),
                    "separate": lambda x=x_vp, y=labels: diffusers_loop(den.model, sched, x, y, a.w, True),
                    "cat": lambda x=x_vp, y=labels: diffusers_loop(den.model, sched, x, y, a.w, False)}
            times = {k: [] for k in runs}
            out = {}
            for k, f in runs.items():                          # warm-up
                out[k] = f()
            for _ in range(a.rounds):
                for k, f in runs.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            diff = (out["guidelab"] - out["separate"]).abs().max().item()
            print(f"| {B} | {med['guidelab']:.3f} s | {med['separate']:.3f} s | {med['cat']:.3f} s | "
                  f"{med['separate'] / med['guidelab']:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
