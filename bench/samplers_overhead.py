"""Sampler overhead: guidelab vs k-diffusion on the same denoiser, and vs NFE x the bare forward time.

    python bench/samplers_overhead.py           # -> bench/out/samplers_overhead.{md,json}

1. Against k-diffusion (its ``sampling.py``, loaded alone as in the tests): the ten samplers both
   have, same denoiser, sigmas and noise, rounds alternating so both see the same machine load.
   Reported: the ratio of the best rounds (least disturbed by other jobs) and the median of per-round ratios.
   Two cheap analytic denoisers
   make the samplers' own cost visible: "tiny" ([64, 2], per-step Python overhead) and "image"
   ([16, 3, 64, 64], tensor arithmetic). Goal: ratio <= 1.0.
2. Against the network: an EDM-preconditioned MLP ([256, 2] input, width 512, 4 layers) whose
   forward dominates; ratio = sampler wall time / (NFE x the time of one bare denoiser call) (best
   rounds, and median of per-round ratios); also the sampler's own cost measured directly (the same run
   with a free denoiser D = x), as ``1 + own / (NFE x forward)``, and the real run split in two by a clock
   around each denoiser call: time inside D / (NFE x forward), and time outside it (the sampler's work
   between forwards) / (NFE x forward).
   Goal: <= 1.05. Batch 64 by default (``--batch``).
3. The guider's own work: one ``guidance.cfg`` call around a stub network (returns its input) against the
   bare tensor ops it does (cat of x / sigma / labels, chunk, lerp) at batch 1, 4, 16. Goal: <= 2x.
Times are this process's CPU time (``--wall``: wall clock): on a loaded machine, descheduled time is no
one's cost. ``--parts forward,guider`` skips the k-diffusion part.
Single-threaded CPU, float32, 50 steps (20 for part 2), glibc keeping freed memory (as training does;
``--malloc glibc`` leaves glibc's defaults, or the ``MALLOC_*_`` environment variables, in force). Part 2
also counts minor page faults (``getrusage``) per denoiser call, for the bare loop and each sampler.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import resource
import statistics
import time

import torch

from guidelab import samplers, schedules
from guidelab.denoisers import EDMPrecond
from guidelab.errors import GuidelabError
from guidelab.rng import SampleNoise
from guidelab.training.loop import keep_freed_memory

SHARED = [
    "euler",
    "heun",
    "euler_ancestral",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpmpp_2s_ancestral",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_kdiffusion():
    spec = importlib.util.spec_from_file_location("_kdiffusion", ROOT / "tests" / "samplers" / "_kdiffusion.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load_sampling()


def gaussian(x, sigma):
    """Exact denoiser of N(0.3, 0.5^2 I): a few element-wise ops."""
    s2 = sigma.reshape((-1,) + (1,) * (x.ndim - 1)) ** 2
    return (x * 0.25 + 0.3 * s2) / (0.25 + s2)


clock = time.perf_counter  # main(): this process's CPU time unless --wall


def timed(fn) -> float:
    t = clock()
    fn()
    return clock() - t


def faults() -> int:
    """Minor page faults of this process so far (a fresh, untouched page costs one)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed_faults(fn, log: list) -> float:
    """``timed(fn)``, appending the page faults taken during the call to ``log``."""
    f = faults()
    t = timed(fn)
    log.append(faults() - f)
    return t


def vs_kdiffusion(K, shape, rounds: int, steps: int = 50) -> dict:
    sigmas = schedules.karras(steps, 0.002, 80.0, dtype=torch.float32)
    x = torch.randn(shape) * 80.0
    out = {}
    for name in SHARED:
        ours = samplers.get(name)
        ref = getattr(K, f"sample_{name}")
        stochastic = samplers.info(name).stochastic
        noise = lambda s, s_next: torch.randn_like(x)  # noqa: E731  the same source for both
        run_ours = lambda: ours(gaussian, x, sigmas, **({"noise": noise} if stochastic else {}))  # noqa: E731
        run_ref = lambda: ref(gaussian, x, sigmas, disable=True, **({"noise_sampler": noise} if stochastic else {}))  # noqa: E731
        run_ours(), run_ref()  # warm-up
        t_ours, t_ref = [], []
        for r in range(rounds):  # who goes first alternates too
            if r % 2:
                t_ref.append(timed(run_ref))
                t_ours.append(timed(run_ours))
            else:
                t_ours.append(timed(run_ours))
                t_ref.append(timed(run_ref))
        ratios = [a / b for a, b in zip(t_ours, t_ref)]
        out[name] = {
            "guidelab_ms": 1e3 * min(t_ours),
            "kdiffusion_ms": 1e3 * min(t_ref),
            "ratio": min(t_ours) / min(t_ref),
            "ratio_median": statistics.median(ratios),
        }
        print(
            f"  {name:20s} guidelab {out[name]['guidelab_ms']:8.2f} ms  k-diffusion {out[name]['kdiffusion_ms']:8.2f} ms"
            f"  ratio {out[name]['ratio']:.3f} (median of rounds {out[name]['ratio_median']:.3f})",
            flush=True,
        )
    return out


class MLP(torch.nn.Module):
    def __init__(self, width=512, depth=4):
        super().__init__()
        layers, d = [], 3
        for _ in range(depth):
            layers += [torch.nn.Linear(d, width), torch.nn.SiLU()]
            d = width
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(d, 2))

    def forward(self, x, c_noise):
        return self.net(torch.cat([x, c_noise[:, None]], 1))


def cold_ops(D, x, s, n: int = 500) -> tuple[float, float]:
    """Mean time (us) of one tiny op of a step (a lerp on [batch, 2]), warm (back to back) and right after a
    forward: what the sampler's own work costs between forwards."""
    warm = cold = 0.0
    with torch.no_grad():
        for _ in range(n):
            t = clock()
            torch.lerp(x, x, 0.5)
            warm += clock() - t
        for _ in range(n):
            y = D(x, s)
            t = clock()
            torch.lerp(y, x, 0.5)
            cold += clock() - t
    return 1e6 * warm / n, 1e6 * cold / n


def vs_forward(rounds: int, steps: int = 20, batch: int = 256, K=None) -> tuple[dict, dict]:
    """Each sampler's wall time over NFE x bare forward (per sampler), and one tiny op's cost warm and right after
    a forward (the second dict)."""
    torch.manual_seed(0)
    net = MLP().eval().requires_grad_(False)
    pre = EDMPrecond(sigma_data=0.5)
    D = lambda x, sigma: pre.denoise(net, x, sigma)  # noqa: E731
    x = torch.randn(batch, 2) * 5.0
    sigmas = schedules.karras(steps, 0.002, 5.0, dtype=torch.float32)
    s = torch.full((batch,), 1.0)
    with torch.no_grad():
        for _ in range(5):
            D(x, s)
    warm_us, cold_us = cold_ops(D, x, s)
    print(f"  one tiny op ([{batch}, 2] lerp): {warm_us:.1f} us warm, {cold_us:.1f} us right after a forward")
    out: dict = {}
    for name in samplers.names():
        count = [0]

        def counted(x_, s_):
            count[0] += 1
            return D(x_, s_)

        try:
            samplers.get(name)(counted, x, sigmas, noise=SampleNoise(range(batch)))
        except GuidelabError as e:  # a sampler that needs more than a denoiser (e.g. dpm_solver_v3's ems=)
            print(f"  {name:20s} skipped: {str(e)[:80]}")
            continue
        nfe = count[0]

        def bare():
            with torch.no_grad():
                for _ in range(nfe):
                    D(x, s)

        stochastic = samplers.info(name).stochastic or name == "ddim"
        # The sampler's own cost, directly: the same run with a free denoiser (D = x).
        t_own = min(timed(lambda: samplers.get(name)(lambda x_, s_: x_, x, sigmas)) for _ in range(rounds))
        t_bare, t_glob, t_seed, f_bare, f_glob, split = [], [], [], [], [], []
        inside = [0.0]

        def clocked(x_, s_):  # D with the time spent inside it summed: splits a real run in two
            t = clock()
            out = D(x_, s_)
            inside[0] += clock() - t
            return out

        ref = getattr(K, f"sample_{name}") if K is not None and name in SHARED else None
        t_ref = []
        for _ in range(rounds):
            t_bare.append(timed_faults(bare, f_bare))
            t_glob.append(timed_faults(lambda: samplers.get(name)(D, x, sigmas), f_glob))
            if ref is not None:  # k-diffusion's sampler on the same denoiser and sigmas, same rounds
                with torch.no_grad():
                    t_ref.append(timed(lambda: ref(D, x, sigmas, disable=True)))
            inside[0] = 0.0
            t_all = timed(lambda: samplers.get(name)(clocked, x, sigmas))
            split.append((inside[0] / t_bare[-1], (t_all - inside[0]) / t_bare[-1]))
            t_seed.append(
                timed(lambda: samplers.get(name)(D, x, sigmas, noise=SampleNoise(range(batch)))) if stochastic else t_glob[-1]
            )
        r_glob, r_seed = min(t_glob) / min(t_bare), min(t_seed) / min(t_bare)
        r_med = statistics.median(a / b for a, b in zip(t_glob, t_bare))
        r_seed_med = statistics.median(a / b for a, b in zip(t_seed, t_bare))
        r_own = 1 + t_own / min(t_bare)
        r_inside, r_outside = (statistics.median(c) for c in zip(*split))
        r_ref = statistics.median(a / b for a, b in zip(t_ref, t_bare)) if t_ref else None
        out[name] = {
            "nfe": nfe,
            "forward_ms": 1e3 * min(t_bare) / nfe,
            "ratio": r_glob,
            "ratio_median": r_med,
            "ratio_sample_noise": r_seed,
            "ratio_sample_noise_median": r_seed_med,
            "own_ms_per_step": 1e3 * t_own / steps,
            "ratio_own": r_own,
            "inside_vs_bare_median": r_inside,
            "outside_vs_bare_median": r_outside,
            "kdiffusion_ratio_median": r_ref,
            "faults_per_call_bare": statistics.median(f_bare) / nfe,
            "faults_per_call": statistics.median(f_glob) / nfe,
        }
        print(
            f"  {name:20s} NFE {nfe:3d}  forward {out[name]['forward_ms']:.2f} ms  ratio {r_glob:.3f}"
            f" (median of rounds {r_med:.3f}, per-sample seeds {r_seed:.3f} ({r_seed_med:.3f}); "
            f"own cost {1e3 * t_own / steps:.3f} ms/step"
            f" -> {r_own:.4f}; in the real run: inside D {r_inside:.3f}, outside D {r_outside:.3f};"
            + (f" k-diffusion {r_ref:.3f};" if r_ref is not None else "")
            + f" page faults per call {out[name]['faults_per_call']:.1f}, bare"
            f" {out[name]['faults_per_call_bare']:.1f})",
            flush=True,
        )
    return out, {"warm": warm_us, "after_forward": cold_us}


def guider_overhead(rounds: int, batches=(1, 4, 16), calls: int = 2000) -> dict:
    """A CFG call's own work: guidance.cfg around a stub network (returns its input) against the bare tensor
    ops it does (cat of x, sigma and labels with the null label, chunk, lerp), same stub. Goal: <= 2x."""
    from guidelab import guidance

    class Stub(torch.nn.Module):
        condition = guidance.Condition("label", {"label": 10}, 10)

        def forward(self, x, sigma, label=None):
            return x

    net, out = Stub(), {}
    for B in batches:
        x, s, lab = torch.randn(B, 3, 16, 16), torch.full((B,), 1.0), torch.arange(B) % 10
        g = guidance.cfg(net, 2.0)

        def bare():
            c, u = net(torch.cat([x, x]), torch.cat([s, s]), label=torch.cat([lab, torch.full_like(lab, 10)])).chunk(2)
            return u.lerp(c, 2.0)

        def ours():
            return g(x, s, label=lab)

        assert torch.equal(ours(), bare())
        t_b, t_o = [], []
        for _ in range(rounds):
            t_b.append(timed(lambda: [bare() for _ in range(calls)]) / calls)
            t_o.append(timed(lambda: [ours() for _ in range(calls)]) / calls)
        out[B] = {"guider_us": 1e6 * min(t_o), "bare_us": 1e6 * min(t_b), "ratio": min(t_o) / min(t_b)}
        r = out[B]
        print(f"  batch {B:3d}: cfg call {r['guider_us']:.1f} us, bare ops {r['bare_us']:.1f} us, ratio {r['ratio']:.2f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds against k-diffusion")
    ap.add_argument("--forward-rounds", type=int, default=7, help="rounds against the bare forward")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--batch", type=int, default=64, help="batch of the forward-dominated part")
    ap.add_argument("--parts", default="kdiffusion,forward,guider", help="comma-separated parts to run")
    ap.add_argument("--wall", action="store_true", help="wall-clock time (default: this process's CPU time)")
    ap.add_argument(
        "--malloc",
        choices=["keep", "glibc"],
        default="keep",
        help="keep: glibc keeps freed blocks (keep_freed_memory); glibc: its defaults / MALLOC_*_ env vars",
    )
    args = ap.parse_args()
    global clock
    if not args.wall:  # on a loaded machine, time spent descheduled is not the sampler's
        clock = time.process_time

    parts = set(args.parts.split(","))
    torch.set_num_threads(1)
    # glibc otherwise returns every freed block over 128 KiB to the OS, and each large temporary is
    # page-faulted in again: timings then swing ~2x with whatever ran before (both samplers alike).
    if args.malloc == "keep":
        keep_freed_memory()
    results = {}
    if "kdiffusion" in parts:
        K = load_kdiffusion()
        for label, shape in [("tiny", (64, 2)), ("image", (16, 3, 64, 64))]:
            print(f"vs k-diffusion, {label} {list(shape)}:")
            results[f"kdiffusion_{label}"] = vs_kdiffusion(K, shape, args.rounds)
    if "forward" in parts:
        print(f"vs NFE x bare forward (MLP, [{args.batch}, 2]):")
        try:
            K = K if "kdiffusion" in parts else load_kdiffusion()  # loaded once when both parts run
        except Exception as e:  # noqa: BLE001 (k-diffusion is optional here: its column is left out)
            print(f"  (k-diffusion not loadable, its column is left out: {e})")
            K = None
        results["forward"], results["tiny_op_us"] = vs_forward(args.forward_rounds, batch=args.batch, K=K)
    if "guider" in parts:
        print("guider's own work per call vs the bare tensor ops (stub network):")
        results["guider"] = guider_overhead(args.rounds)

    import os

    lines = [
        f"load average while measuring: {os.getloadavg()[0]:.1f} (2 cores); {'wall' if args.wall else 'CPU'} time;"
        f" malloc: {args.malloc}",
    ]
    if "kdiffusion" in parts:
        lines += [
            "",
            "| sampler | tiny: guidelab / k-diffusion (ms) | ratio (median) | image: guidelab / k-diffusion (ms) "
            "| ratio (median) |",
            "|---|---:|---:|---:|---:|",
        ]
    for name in SHARED if "kdiffusion" in parts else []:
        a, b = results["kdiffusion_tiny"][name], results["kdiffusion_image"][name]
        lines.append(
            f"| {name} | {a['guidelab_ms']:.1f} / {a['kdiffusion_ms']:.1f} | {a['ratio']:.2f} ({a['ratio_median']:.2f}) | "
            f"{b['guidelab_ms']:.1f} / {b['kdiffusion_ms']:.1f} | {b['ratio']:.2f} ({b['ratio_median']:.2f}) |"
        )
    lines += (
        []
        if "forward" not in results
        else [
            "",
            f"one tiny op of a step ([batch, 2] lerp): {results['tiny_op_us']['warm']:.1f} us warm, "
            f"{results['tiny_op_us']['after_forward']:.1f} us right after a forward",
            "",
            "| sampler | NFE | forward (ms) | time / (NFE x forward) (median) | with per-sample seeds (median) "
            "| own cost (ms/step) | 1 + own / (NFE x forward) | real run: inside D / outside D (median) "
            "| k-diffusion, same D (median) | page faults per call (bare) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    )
    for name, r in results.get("forward", {}).items():
        kd = "" if r["kdiffusion_ratio_median"] is None else f"{r['kdiffusion_ratio_median']:.3f}"
        lines.append(
            f"| {name} | {r['nfe']} | {r['forward_ms']:.2f} | {r['ratio']:.3f} ({r['ratio_median']:.3f}) | "
            f"{r['ratio_sample_noise']:.3f} ({r['ratio_sample_noise_median']:.3f}) | "
            f"{r['own_ms_per_step']:.3f} | {r['ratio_own']:.4f} | "
            f"{r['inside_vs_bare_median']:.3f} / {r['outside_vs_bare_median']:.3f} | {kd} | "
            f"{r['faults_per_call']:.1f} ({r['faults_per_call_bare']:.1f}) |"
        )
    if "guider" in results:
        lines += ["", "| batch | cfg call (us) | bare cat + chunk + lerp (us) | ratio |", "|---:|---:|---:|---:|"]
        lines += [f"| {b} | {r['guider_us']:.1f} | {r['bare_us']:.1f} | {r['ratio']:.2f} |" for b, r in results["guider"].items()]
    table = "\n".join(lines)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samplers_overhead.json").write_text(json.dumps(results, indent=1))
    (out / "samplers_overhead.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
