"""guidelab's guided loop vs the diffusers pipeline call on the same random model, same steps, scheduler, latents,
side by side in one run, CFG (FLUX: true CFG with a negative prompt) at w = 5. Prints one JSON line per family:
both sides' best and median wall times and median CPU times (``time.process_time``) over ``--repeats`` rounds
(the two calls interleaved, the order alternating, loading excluded on both sides), the ratio of the bests and the
medians of the per-round ratios guidelab / diffusers (wall and CPU), the max abs difference of the two images,
(CPU) each side's median time outside the denoiser network per run (text encoders, sampler / scheduler,
guidance, VAE), the physical floor (NFE x one batched network forward, replayed alone in the same run) and the
1-min load average.

    OMP_NUM_THREADS=1 .venv/bin/python bench/pipeline_speed.py [--steps 20] [--repeats 3] [--families sd,sd3]
        [--device cuda] [--dtype fp16|bf16|fp32] [--size tiny|mid] [--batch 4] [--out results.jsonl]

``--size tiny``: the test suite's tiny pipelines (tests/integrations); ``mid``: SD / SD3 with ~30-60 M parameter
denoisers at 32x32 latents (where the network, not Python, should dominate).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integrations"))
from test_diffusers_pipelines import clip_text, clip_tokenizer, sd3_folder, sd_folder, tiny_vae  # noqa: E402
from test_diffusers_pipelines_families import FLUX_SIZE, flux_folder, pixart_folder, sdxl_folder  # noqa: E402

from guidelab.integrations.diffusers import load_pipeline  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sd_mid(tmp: Path) -> Path:
    """SD 1.x layout, UNet (64, 128, 128) channels, 32x32 latents, DDIM."""
    tok, vocab = clip_tokenizer(tmp / "tok")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(64, 128, 128),
        cross_attention_dim=64,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=clip_text(vocab, dim=64),
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = tmp / "sd-mid"
    pipe.save_pretrained(out)
    return out


def sd3_mid(tmp: Path) -> Path:
    """SD3 layout, 4 joint blocks of width 256, 32x32 latents (patch 2: 256 tokens), FlowMatchEuler shift 3."""
    tok, vocab = clip_tokenizer(tmp / "tok")
    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=256,
        pooled_projection_dim=128,
        pos_embed_max_size=32,
    )
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1, scaling_factor=1.5)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=net,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip_text(vocab, dim=64, projection=True),
        tokenizer=tok,
        text_encoder_2=clip_text(vocab, dim=64, projection=True),
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    out = tmp / "sd3-mid"
    pipe.save_pretrained(out)
    return out


#: family -> (label, builder per size, pipeline class, latent shape of one sample, extra call keywords)
FAMILIES = {
    "sd": ("SD (DDIM)", {"tiny": sd_folder, "mid": sd_mid}, "StableDiffusionPipeline", {}),
    "sd3": ("SD3 (flow Euler)", {"tiny": sd3_folder, "mid": sd3_mid}, "StableDiffusion3Pipeline", {}),
    "sdxl": ("SDXL (Euler)", {"tiny": sdxl_folder}, "StableDiffusionXLPipeline", {}),
    "pixart": ("PixArt alpha (DDIM)", {"tiny": pixart_folder}, "PixArtAlphaPipeline", {"use_resolution_binning": False}),
    "flux": ("FLUX (true CFG)", {"tiny": flux_folder}, "FluxPipeline", FLUX_SIZE),
}


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; CPU is ``time.process_time`` (on a loaded machine the time this process
    waits descheduled is not counted, so it scatters less than wall time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


class NetClock:
    """Wall time spent inside a module's forward (CPU only: on CUDA the launch is asynchronous), the number of
    calls, and the first call's inputs (the floor replays them)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.seconds, self.calls, forward = 0.0, 0, net.forward
        self.first: tuple[tuple, dict] | None = None
        self.forward = forward

        def timed_forward(*args: object, **kw: object) -> object:
            if self.first is None:
                self.first = (args, kw)
            t0 = time.perf_counter()
            try:
                return forward(*args, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        net.forward = timed_forward

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def side_by_side(ours: Callable, theirs: Callable, rounds: int, device: torch.device, clocks=None) -> dict:
    """Both calls interleaved over ``rounds`` (the order rotating each round, so a load drift hits all alike): best
    and median wall and CPU times of each, the medians of the per-round ratios and, with ``clocks`` (CPU), each
    side's median time outside the denoiser network per run and the physical floor (:func:`floor_call`), timed in
    the same rounds."""
    names = ["ours", "theirs"]
    sides: dict[str, tuple[Callable, NetClock | None]] = {"ours": (ours, None), "theirs": (theirs, None)}
    if clocks:
        sides = {"ours": (ours, clocks[0]), "theirs": (theirs, clocks[1]), "floor": (floor_call(clocks[0], ours), None)}
        names.append("floor")
    rec: dict[str, list[list[float]]] = {n: [[], [], []] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, clock = sides[name]
            if clock:
                clock.reset()
            wall, cpu = timed(fn, device)
            rec[name][0].append(wall)
            rec[name][1].append(cpu)
            rec[name][2].append(wall - clock.seconds if clock else float("nan"))
    med = statistics.median
    (wa, ca, oa), (wb, cb, ob) = rec["ours"], rec["theirs"]
    out = {
        "guidelab_s": min(wa),
        "diffusers_s": min(wb),
        "guidelab_median_s": med(wa),
        "diffusers_median_s": med(wb),
        "median_pair_ratio": med(x / y for x, y in zip(wa, wb, strict=True)),
        "guidelab_cpu_s": med(ca),
        "diffusers_cpu_s": med(cb),
        "cpu_median_pair_ratio": med(x / y for x, y in zip(ca, cb, strict=True)),
    }
    if clocks:
        out.update(guidelab_outside_net_ms=1000 * med(oa), diffusers_outside_net_ms=1000 * med(ob))
        wf, cf, _ = rec["floor"]
        out.update(nfe=clocks[0].calls, floor_s=min(wf), floor_median_s=med(wf), floor_cpu_s=med(cf))
    return out


def floor_call(clock: NetClock, ours: Callable) -> Callable[[], None]:
    """The physical floor of one run: NFE x one network forward, guidelab's first batched inputs (captured by one
    run of ``ours``) replayed alone under ``torch.inference_mode`` (no text encoder, sampler, guidance or VAE)."""
    clock.first = None
    clock.reset()
    ours()
    assert clock.first is not None
    (args, kw), nfe, forward = clock.first, clock.calls, clock.forward

    def run() -> None:
        with torch.inference_mode():
            for _ in range(nfe):
                forward(*args, **kw)

    return run


def measure(family: str, size: str, a, tmp: Path) -> dict:
    label, builders, cls, extra = FAMILIES[family]
    dtype, device = DTYPES[a.dtype], torch.device(a.device)
    folder = builders[size](tmp / f"{family}-{size}")
    pipe = load_pipeline(folder, dtype=dtype, device=device)
    h, w, _ = pipe.size(extra.get("height"), extra.get("width"))
    shape = [a.batch, *pipe.latent_shape(h, w)]
    L = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cube"] * a.batch
    flux = family == "flux"
    size_kw = {k: extra[k] for k in ("height", "width") if k in extra}
    neg = {"negative_prompt": "dark"} if flux else {}

    def ours():
        return pipe.generate(prompts, guider="cfg", w=5.0, steps=a.steps, latents=L, seeds=[0], **neg, **size_kw)

    ref = getattr(diffusers, cls).from_pretrained(folder, local_files_only=True, torch_dtype=dtype, **absent(folder))
    ref = ref.to(device)
    ref.set_progress_bar_config(disable=True)
    scale = {"true_cfg_scale": 5.0, "guidance_scale": 3.5} if flux else {"guidance_scale": 5.0}

    def theirs():
        with torch.no_grad():
            return ref(
                prompts, num_inference_steps=a.steps, latents=L.to(device, dtype), output_type="pt", **scale, **neg, **extra
            ).images

    diff = (ours().float().cpu() - theirs().float().cpu()).abs().max().item()  # also the warm-up of both
    clocks = None if device.type == "cuda" else (NetClock(pipe.net), NetClock(getattr(ref, "unet", None) or ref.transformer))
    load = os.getloadavg()[0]
    t = side_by_side(ours, theirs, a.repeats, device, clocks)
    row = {"family": label, "size": size, "device": str(device), "dtype": a.dtype, "batch": a.batch, "steps": a.steps}
    row.update({k: round(v, 4) for k, v in t.items()})
    row["ratio"] = round(t["guidelab_s"] / t["diffusers_s"], 3)
    row["max_abs_diff"] = float(f"{diff:.3g}")
    row["load"] = round((load + os.getloadavg()[0]) / 2, 2)  # 1-min load average, before / after
    return row


def absent(folder: Path) -> dict:
    spec = json.loads((folder / "model_index.json").read_text())
    return {k: None for k, v in spec.items() if isinstance(v, list) and v[0] is None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--families", default="sd,sd3", help=f"comma-separated, of {', '.join(FAMILIES)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--size", default="tiny", choices=["tiny", "mid"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    a = ap.parse_args()
    fams = [f.strip() for f in a.families.split(",") if f.strip()]
    bad = [f for f in fams if f not in FAMILIES or a.size not in FAMILIES[f][1]]
    if bad:
        ap.error(f"no {a.size} model for {', '.join(bad)} (tiny: {', '.join(FAMILIES)}; mid: sd, sd3)")
    with tempfile.TemporaryDirectory() as tmp:
        for fam in fams:
            line = json.dumps(measure(fam, a.size, a, Path(tmp)))
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
