"""Guided sampling of one diffusers UNet: guidelab (all branches in one batched call) against diffusers-style
DDIM loops with separate passes per branch, and, for reference, diffusers' loop with the branches
concatenated, as its classic pipelines do.

A randomly initialised class-conditional UNet2DModel (saved to and loaded from a temporary folder), DDIM,
same timesteps. ``--guider cfg`` (default): CFG weight ``--w``, two branches. ``--guider pag-cfg``: CFG
``--w`` plus PAG at diffusers' ``pag_scale = --pag-scale`` (guidelab ``w = 1 + pag_scale``) on every
self-attention, three branches; the concatenated reference runs diffusers' own
``PAGCFGIdentitySelfAttnProcessor2_0`` on [uncond, cond, cond]; the separate loop runs the perturbed pass
under guidelab's ``perturbed_attention`` hook with every row marked (diffusers has no processor that
perturbs a whole batch). Times are medians over rounds (rounds alternate the loops). Checks that guidelab's
samples equal the separate-pass loop's.

``--costs``: one guided denoiser call of each attention rule (cfg, nag, sag, sag + cfg, pag + cfg) on a
randomly initialised text UNet2DConditionModel (``--size``, ``--width``; 16 prompt tokens), relative to one
unguided call, medians over ``--rounds``.

``--overhead`` (cfg only): the same guided call with the network replaced by a stub that returns its input,
so only guidelab's wrapper (branch overrides, batching, sigma -> timestep, EDM conversion, combination) is
timed, against the bare concatenate-chunk-combine of the reference loop. Usage:
    python bench/diffusers_guided.py [--guider cfg|pag-cfg] [--batches 1,4,16] [--steps 10] [--size 32]
                                     [--width 64] [--rounds 3] [--threads 0] [--overhead] [--costs]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.models.attention_processor import (
    Attention,
    PAGCFGIdentitySelfAttnProcessor2_0,
)

from guidelab import guidance, samplers
from guidelab.integrations import diffusers as gd

NULL = 10


def build(folder, size, width):
    torch.manual_seed(0)
    UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(width, 2 * width, 2 * width),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=min(32, width),
        attention_head_dim=min(32, width),
        num_class_embeds=NULL + 1,
    ).save_pretrained(folder)
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


@torch.no_grad()
def diffusers_pag_loop(model, pag_model, sched, x_vp, labels, w, pag_scale, separate):
    """``u + w (c - u) + pag_scale (c - p)`` as diffusers' PAG pipelines combine it."""
    null = torch.full_like(labels, NULL)
    x = x_vp
    everything = torch.ones(x.shape[0], dtype=torch.bool)
    for t in sched.timesteps:
        if separate:
            c = model(x, t, class_labels=labels).sample
            u = model(x, t, class_labels=null).sample
            with gd.perturbed_attention(model, gd.Perturbation("pag", "all"), everything):
                p = model(x, t, class_labels=labels).sample
        else:
            u, c, p = pag_model(torch.cat([x, x, x]), t, class_labels=torch.cat([null, labels, labels])).sample.chunk(3)
        x = sched.step(u + w * (c - u) + pag_scale * (c - p), t, x).prev_sample
    return x


def overhead(den, guided, k, batches, rounds, size):
    """Microseconds per guided call with a stub network: guidelab's wrapper against the bare reference."""

    class Stub(torch.nn.Module):
        def forward(self, x, timestep, class_labels=None, return_dict=False):
            return (x,)

    stub = Stub()
    stub.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))
    model, den.model = den.model, stub
    print(f"| batch | guidelab wrapper, {k} branches | bare cat + chunk + combine |\n|---|---|---|")
    try:
        for B in batches:
            x, s = torch.randn(B, 3, size, size), torch.full((B,), 5.0)
            y = torch.randint(NULL, (B,))

            def ours(x=x, s=s, y=y):
                return guided(x, s, class_labels=y)

            def bare(x=x, s=s, y=y):
                labels = torch.cat([torch.full_like(y, NULL)] + [y] * (k - 1))
                return stub(torch.cat([x] * k), s.repeat(k), class_labels=labels)[0].chunk(k)[0] * 3

            times = {"ours": [], "bare": []}
            with torch.no_grad():
                for _ in range(rounds):
                    for name, f in (("ours", ours), ("bare", bare)):
                        t = time.perf_counter()
                        for _ in range(200):
                            f()
                        times[name].append((time.perf_counter() - t) / 200 * 1e6)
            print(f"| {B} | {statistics.median(times['ours']):.0f} us | {statistics.median(times['bare']):.0f} us |")
    finally:
        den.model = model


@torch.no_grad()
def costs(size, width, rounds, w, batch=4):
    """One call of each attention rule against one unguided call (text UNet, random weights)."""
    from diffusers import UNet2DConditionModel

    from guidelab.integrations.diffusers.guiders import nag
    from guidelab.integrations.diffusers.sag import sag

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        UNet2DConditionModel(
            sample_size=size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(width, 2 * width),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=min(32, width),
            cross_attention_dim=64,
            attention_head_dim=8,
        ).save_pretrained(tmp)
        DDIMScheduler(clip_sample=False).save_config(tmp)
        den = gd.load(tmp, null_text=torch.randn(1, 16, 64))
        x, sigma, emb = torch.randn(batch, 4, size, size) * 3, torch.full((batch,), 3.0), torch.randn(batch, 16, 64)
        rules = {
            "unguided": den,
            f"cfg w={w}": guidance.cfg(den, w),
            "nag w=5 (tau 2.5, alpha 0.5)": nag(den, 5.0),
            "sag w=1.75": sag(den, 1.75),
            f"sag w=1.75 + cfg {w}": sag(den, 1.75, cfg_weight=w),
            f"pag w=3 + cfg {w}": gd.pag(den, 3.0, cfg_weight=w),
        }
        times: dict[str, list[float]] = {k: [] for k in rules}
        for _ in range(rounds):  # rounds alternate the rules
            for k, g in rules.items():
                t0 = time.perf_counter()
                g(x, sigma, encoder_hidden_states=emb)
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["unguided"])
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    n = sum(p.numel() for p in den.model.parameters()) / 1e6
    print(f"UNet2DConditionModel {n:.1f} M params, {size}x{size}, batch {batch}")
    print("| rule | ms per call | x unguided |\n|---|---|---|")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"| {k} | {m * 1e3:.0f} | {m / base:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--guider", choices=["cfg", "pag-cfg"], default="cfg")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=int, default=64, help="channels of the first UNet level (then 2x, 2x)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    ap.add_argument("--w", type=float, default=3.0, help="CFG weight (diffusers' guidance_scale)")
    ap.add_argument("--pag-scale", type=float, default=1.5, help="pag-cfg: diffusers' pag_scale (guidelab w - 1)")
    ap.add_argument("--overhead", action="store_true", help="time guidelab's wrapper alone (stub network)")
    ap.add_argument("--costs", action="store_true", help="cost of nag / sag / pag per call on a text UNet")
    a = ap.parse_args()
    if a.costs:
        if a.threads:
            torch.set_num_threads(a.threads)
        costs(a.size, a.width, a.rounds, a.w)
        return
    if a.overhead and a.guider != "cfg":
        ap.error("--overhead measures the cfg wrapper only (attention hooks need the real network)")
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"load average {os.getloadavg()}, cores {os.cpu_count()}, torch threads {torch.get_num_threads()}")
    batches = [int(b) for b in a.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, a.size, a.width)
        den = gd.load(tmp, null_label=NULL)
        sched = DDIMScheduler.from_pretrained(tmp, local_files_only=True)
        sched.set_timesteps(a.steps)
        sigmas = den.sigmas(a.steps, sched.config.timestep_spacing).float()
        if a.guider == "cfg":
            guided, k = guidance.cfg(den, a.w), 2
        else:
            guided, k = gd.pag(den, 1 + a.pag_scale, layers="all", cfg_weight=a.w), 3
            pag_model = UNet2DModel.from_pretrained(tmp, local_files_only=True).eval()
            for m in pag_model.modules():
                if isinstance(m, Attention) and not m.is_cross_attention:
                    m.set_processor(PAGCFGIdentitySelfAttnProcessor2_0())
        if a.overhead:
            overhead(den, guided, k, batches, a.rounds, a.size)
            return
        print(
            f"UNet2DModel {sum(p.numel() for p in den.model.parameters()) / 1e6:.1f} M params, "
            f"{a.size}x{a.size}, DDIM {a.steps} steps, {a.guider} w={a.w}"
            + (f" pag_scale={a.pag_scale}" if a.guider == "pag-cfg" else "")
        )
        print(
            f"| batch | guidelab ({k} branches, one call) | diffusers, separate passes | diffusers, cat batch | "
            "speed-up vs separate | max abs diff |"
        )
        print("|---|---|---|---|---|---|")
        for B in batches:
            g = torch.Generator().manual_seed(B)
            x_vp = torch.randn(B, 3, a.size, a.size, generator=g)
            labels = torch.randint(NULL, (B,), generator=g)
            x = x_vp * (1 + sigmas[0] ** 2).sqrt()
            runs = {"guidelab": lambda x=x, y=labels: samplers.ddim(guided, x, sigmas, cond={"class_labels": y})}
            if a.guider == "cfg":
                runs["separate"] = lambda x=x_vp, y=labels: diffusers_loop(den.model, sched, x, y, a.w, True)
                runs["cat"] = lambda x=x_vp, y=labels: diffusers_loop(den.model, sched, x, y, a.w, False)
            else:
                runs["separate"] = lambda x=x_vp, y=labels: diffusers_pag_loop(
                    den.model, pag_model, sched, x, y, a.w, a.pag_scale, True
                )
                runs["cat"] = lambda x=x_vp, y=labels: diffusers_pag_loop(
                    den.model, pag_model, sched, x, y, a.w, a.pag_scale, False
                )
            times = {k: [] for k in runs}
            out = {}
            for name, f in runs.items():  # warm-up
                out[name] = f()
            for _ in range(a.rounds):
                for name, f in runs.items():
                    t = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t)
            med = {name: statistics.median(v) for name, v in times.items()}
            diff = max((out["guidelab"] - out[ref]).abs().max().item() for ref in ("separate", "cat"))
            print(
                f"| {B} | {med['guidelab']:.3f} s | {med['separate']:.3f} s | {med['cat']:.3f} s | "
                f"{med['separate'] / med['guidelab']:.2f}x | {diff:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
