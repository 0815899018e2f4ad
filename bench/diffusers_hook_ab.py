"""Attention-perturbation hook of another revision against the current one, side by side in one process.

Times one guided call (PAG or SEG together with CFG: one network call of 3B rows) of the same randomly
initialised class-conditional UNet2DModel as bench/diffusers_guided.py, alternating the two hooks round by
round; for PAG also diffusers' own ``PAGCFGIdentitySelfAttnProcessor2_0`` on the same batch. The other
revision's ``perturbed_attention`` is read with ``git show`` (``src/guidelab/integrations/diffusers/hooks.py``, or
``diffusers.py`` before the package split) and swapped into the adapter (with its module search redone at every
call, as early revisions did).
Checks that both give the same output. Usage:
    python bench/diffusers_hook_ab.py --rev 84613fa [--mode pag|seg] [--batches 1,4,16] [--size 32] [--width 64]
"""

from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
import tempfile
import time

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import (
    Attention,
    PAGCFGIdentitySelfAttnProcessor2_0,
)

from diffusers_guided import NULL, build
from guidelab.integrations import diffusers as gd
from guidelab.integrations.diffusers import adapter, hooks


def hook_of(rev: str):
    """``perturbed_attention`` as written at ``rev``, defined in the current hooks module's namespace."""
    for path in ("src/guidelab/integrations/diffusers/hooks.py", "src/guidelab/integrations/diffusers.py"):
        got = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=False)
        if got.returncode == 0:
            src = got.stdout
            break
    else:
        raise SystemExit(f"no diffusers hooks at {rev}")
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "perturbed_attention")
    code = ast.get_source_segment(src, node)
    code = "@contextlib.contextmanager\n" + code.replace("perturbation.modules(model)", "perturbation._search(model)")
    namespace = dict(vars(hooks))
    exec(code, namespace)  # noqa: S102 -- our own code at another revision, for the side-by-side timing
    return namespace["perturbed_attention"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", required=True, help="git revision whose hook is compared with the current one")
    ap.add_argument("--mode", choices=["pag", "seg"], default="pag")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    old_hook, new_hook = hook_of(a.rev), gd.perturbed_attention
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, a.size, a.width)
        den = gd.load(tmp, null_label=NULL)
        ref = UNet2DModel.from_pretrained(tmp, local_files_only=True).eval()
        for m in ref.modules():
            if isinstance(m, Attention) and not m.is_cross_attention:
                m.set_processor(PAGCFGIdentitySelfAttnProcessor2_0())
        guided = gd.attention_guidance(den, 2.5, a.mode, layers="all", cfg_weight=3.0)
        params = sum(p.numel() for p in den.model.parameters()) / 1e6
        print(f"| guider | model | batch | hook at {a.rev} | current hook | diffusers PAG processor | speed-up | max abs diff |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for B in [int(b) for b in a.batches.split(",")]:
            x, sigma = torch.randn(B, 3, a.size, a.size), torch.full((B,), 5.0)
            y = torch.randint(NULL, (B,))
            t = den.timestep(sigma).float()

            def with_hook(hook, x=x, sigma=sigma, y=y):
                adapter.perturbed_attention = hook
                try:
                    return guided(x, sigma, class_labels=y)
                finally:
                    adapter.perturbed_attention = new_hook

            def diffusers_pag(x=x, t=t, y=y):
                return ref(torch.cat([x] * 3), t.repeat(3), class_labels=torch.cat([torch.full_like(y, NULL), y, y]))

            runs = {"old": lambda: with_hook(old_hook), "new": lambda: with_hook(new_hook)}
            if a.mode == "pag":
                runs["diffusers"] = diffusers_pag
            times = {k: [] for k in runs}
            n = max(1, 8 // B)
            with torch.no_grad():
                diff = (runs["old"]() - runs["new"]()).abs().max().item()
                for _ in range(a.rounds):
                    for k, f in runs.items():
                        t0 = time.perf_counter()
                        for _ in range(n):
                            f()
                        times[k].append((time.perf_counter() - t0) / n * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            d = f"{med['diffusers']:.1f} ms" if "diffusers" in med else "-"
            print(
                f"| {a.mode}+cfg | {params:.1f} M, {a.size}x{a.size} | {B} | {med['old']:.1f} ms | {med['new']:.1f} ms | "
                f"{d} | {med['old'] / med['new']:.2f}x | {diff:.0e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
