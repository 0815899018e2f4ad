"""guidelab's guided loop vs the diffusers pipeline call on the same tiny model, same steps and scheduler, side by
side in one run (SD with DDIM, SD3 with FlowMatchEuler), CFG at w = 5. Prints the wall times and their ratio.

    OMP_NUM_THREADS=1 .venv/bin/python bench/pipeline_speed.py [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integrations"))
from test_diffusers_pipelines import sd3_folder, sd_folder  # noqa: E402  (the tests' tiny pipelines)

from guidelab.integrations.diffusers import load_pipeline  # noqa: E402


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, make, cls in (
            ("SD (DDIM)", sd_folder, "StableDiffusionPipeline"),
            ("SD3 (flow Euler)", sd3_folder, "StableDiffusion3Pipeline"),
        ):
            folder = make(Path(tmp) / family.split()[0])
            L = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            prompts = ["a red cube"] * 4
            pipe = load_pipeline(folder)
            ours = best(
                lambda pipe=pipe, prompts=prompts, L=L: pipe.generate(
                    prompts, guider="cfg", w=5.0, steps=a.steps, latents=L, seeds=[0]
                ),
                a.repeats,
            )
            spec = json.loads((folder / "model_index.json").read_text())
            absent = {k: None for k, v in spec.items() if isinstance(v, list) and v[0] is None}
            ref = getattr(diffusers, cls).from_pretrained(folder, local_files_only=True, **absent)
            ref.set_progress_bar_config(disable=True)

            def call(ref=ref, L=L, prompts=prompts):
                with torch.no_grad():
                    return ref(prompts, guidance_scale=5.0, num_inference_steps=a.steps, latents=L, output_type="pt")

            theirs = best(call, a.repeats)  # loading excluded on both sides
            rows.append(
                {
                    "family": family,
                    "steps": a.steps,
                    "guidelab_s": round(ours, 4),
                    "diffusers_s": round(theirs, 4),
                    "ratio": round(ours / theirs, 3),
                }
            )
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
