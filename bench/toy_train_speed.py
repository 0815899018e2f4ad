"""Time one toy training iteration at batch 4096: guidelab vs the paper's reference code.

An iteration is everything the paper's loop does per step: draw sigma, draw exact samples of
p(x; sigma), evaluate the exact target score, the network's score (forward and backward through the
trunk) and its gradient, Adam, EMA. Ours is timed through ``Trainer.train_step``, the step
``train_toy`` runs.

    python bench/toy_train_speed.py                      # guidelab only
    python bench/toy_train_speed.py --edm2 /tmp/edm2     # side by side with NVlabs/edm2 toy_example.py

The floor is timed in the same run, alternating with our iterations (each step right after a floor): every matrix product one
iteration makes (recorded with a dispatch mode: aten mm / addmm / bmm with their shapes), replayed alone
on tensors of the same shapes, plus the exact-score exponentials (one ``exp`` over [batch, components]).
Goal: iteration <= 1.5 x floor. ``--threads 1`` with ``OMP_NUM_THREADS=1`` is the setting to compare.
Timed in the same rounds: the plain-torch step, the fused one (``toy_trainer(fuse=True)``: the exact score as
one compiled kernel, guidelab.fused; skipped with ``--no-fuse`` or without a C++ compiler) and the former loss
(the full exact sum).

``--edm2`` is a local checkout of NVlabs/edm2 (not part of guidelab; nothing of it is copied here).
Its ``do_train`` is imported and run on the CPU with plotting and pickling switched off; rounds of the
two alternate so that both see the same machine load, and the ratio is taken per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import torch

from guidelab import fused
from guidelab.toy import tree
from guidelab.training import ToyConfig, toy_trainer


def load_reference(path: str):
    """Import edm2's toy_example.py from ``path``, patched to run quietly on the CPU."""
    sys.path.insert(0, path)
    for name in ("requests",):  # imported by dnnlib.util but unused by the toy example
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    import toy_example  # noqa: E402

    toy_example.tqdm.tqdm = lambda it, **kwargs: it  # no progress bar inside the timed loop
    return toy_example


def record_matmuls(trainer, step=None) -> list[tuple[str, tuple]]:
    """The matrix products of one ``train_step`` (or of ``step()``): (op, input shapes) in call order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    # every overload (``out=`` ones too: models.mlp's backward writes products into scratch buffers)
    ops = {torch.ops.aten.mm: "mm", torch.ops.aten.addmm: "addmm", torch.ops.aten.bmm: "bmm"}
    seen: list[tuple[str, tuple]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in ops:  # the inputs are positional; an out= buffer is a keyword
                seen.append((ops[func.overloadpacket], tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
            return func(*args, **(kwargs or {}))

    with Record():
        (step or trainer.train_step)()
    return seen


def network_part(trainer, batch: int, rounds: int, n: int = 10) -> tuple[float, float, int]:
    """The network's share alone: its score loss, forward + backward (the hand-written backward of
    ``models.mlp._EnergyScore``), on one fixed batch, beside that step's own matrix products replayed alone.
    Returns (median step time, median floor, number of products)."""
    cfg = ToyConfig(batch=batch)
    world, gen = tree(cfg.classes), torch.Generator().manual_seed(2)
    sigma = (torch.randn(batch, generator=gen) * cfg.P_std + cfg.P_mean).exp()
    x = world.sample(batch, sigma, generator=gen)
    target = world.score_fast(x, sigma)
    net = trainer.net

    def step():
        net.zero_grad(set_to_none=True)
        (sigma**2 * (net.score(x, sigma) - target).square().mean(1)).mean().backward()

    matmuls = record_matmuls(trainer, step)
    g = torch.Generator().manual_seed(1)
    args = [(op, [torch.randn(sh, generator=g) for sh in shapes]) for op, shapes in matmuls]
    fns = {"mm": torch.mm, "addmm": torch.addmm, "bmm": torch.bmm}

    def floor():
        for op, a in args:
            fns[op](*a)

    step(), floor()
    t_step, t_floor = [], []
    for _ in range(rounds):
        t_step.append(timed_n(step, n))
        t_floor.append(timed_n(floor, n))
    return statistics.median(t_step), statistics.median(t_floor), len(matmuls)


def floor_fn(matmuls, batch: int, components: int):
    """A function that runs the recorded products and the exact-score exponentials alone."""
    g = torch.Generator().manual_seed(1)
    args = [(op, [torch.randn(s, generator=g) for s in shapes]) for op, shapes in matmuls]
    fns = {"mm": torch.mm, "addmm": torch.addmm, "bmm": torch.bmm}
    e = torch.randn(batch, components, generator=g)

    def run():
        for op, a in args:
            fns[op](*a)
        e.exp()

    return run


def timed_n(fn, n: int) -> float:
    t0 = CLOCK()
    for _ in range(n):
        fn()
    return (CLOCK() - t0) / n


def before_trainer(cfg):
    """The same trainer with the former loss (the full exact score instead of score_fast), for before/after."""
    from guidelab.training.loop import Trainer

    world = tree(cfg.classes)

    def loss_fn(net, batch, gen):
        sigma = (torch.randn(batch, generator=gen) * cfg.P_std + cfg.P_mean).exp()
        x = world.sample(batch, sigma, generator=gen)
        return sigma**2 * (net.score(x, sigma) - world.score(x, sigma)).square().mean(1)

    return Trainer(cfg.model(), loss_fn, cfg.loop())


CLOCK = time.process_time  # CPU time of this process: on a loaded machine, time spent descheduled is not counted


def time_ours(trainer, n: int) -> float:
    t0 = CLOCK()
    for _ in range(n):
        trainer.train_step()
    return (CLOCK() - t0) / n


def time_reference(ref, n: int, batch: int, hidden: int) -> float:
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    ref.do_train(classes="A", hidden_dim=hidden, batch_size=batch, total_iter=n, viz_iter=None, pkl_pattern=None, device=cpu)
    return (time.perf_counter() - t0) / n


def prefetched(cfg, args, floors) -> None:
    """Wall time per step with and without the batch worker (``training.prefetch``), alternating rounds."""
    from guidelab.training.prefetch import Prefetcher

    plain, ahead = toy_trainer(cfg, fuse=False), toy_trainer(cfg, fuse=False)
    n, total = args.iters, args.iters * (args.rounds + 1)
    walls, pwalls = [], []
    with Prefetcher(ahead.loss_fn, seed=cfg.seed, batch=cfg.batch, start=0, stop=total, threads=args.threads) as pre:
        for r in range(args.rounds + 1):  # round 0: warm-up (the worker's start)
            t0 = time.perf_counter()
            for _ in range(n):
                plain.train_step()
            t1 = time.perf_counter()
            for _ in range(n):
                ahead.train_step(pre.get(ahead.step))
            t2 = time.perf_counter()
            if r:
                walls.append((t1 - t0) / n)
                pwalls.append((t2 - t1) / n)
                print(f"prefetch round {r}: plain {walls[-1] * 1e3:6.1f} ms/it   prefetched {pwalls[-1] * 1e3:6.1f} ms/it (wall)")
    med, f = statistics.median, statistics.median(floors)
    print(
        f"prefetched (2 processes, {args.threads} thread(s) each): {med(pwalls) * 1e3:.1f} ms per iteration wall, "
        f"{med(pwalls) / f:.2f} x floor; plain {med(walls) * 1e3:.1f} ms wall ({med(walls) / f:.2f} x floor); "
        f"speed-up {med([a / b for a, b in zip(walls, pwalls)]):.2f}x (median per round)"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edm2", help="path of a NVlabs/edm2 checkout: time its toy_example.py side by side")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--wall", action="store_true", help="wall-clock time instead of this process's CPU time")
    ap.add_argument("--iters", type=int, default=20, help="our iterations per round")
    ap.add_argument("--no-fuse", action="store_true", help="do not time the fused step")
    ap.add_argument("--ref-iters", type=int, default=2, help="reference iterations per round")
    ap.add_argument(
        "--prefetch",
        action="store_true",
        help="also time the plain step with its batches computed in a second process (train_toy's default when a core "
        "is free), in wall time, beside the plain step's wall time",
    )
    default_threads = torch.get_num_threads()
    ap.add_argument(
        "--threads",
        type=int,
        default=default_threads,
        help=f"torch threads for guidelab (default: torch's default, as train_toy; here {default_threads})",
    )
    ap.add_argument(
        "--ref-threads",
        type=int,
        default=default_threads,
        help=f"torch threads for the reference (default: torch's default, here {default_threads})",
    )
    args = ap.parse_args(argv)

    print(
        f"torch {torch.__version__}, batch {args.batch}, hidden {args.hidden}, threads: guidelab {args.threads}"
        + (f", reference {args.ref_threads}" if args.edm2 else "")
    )
    torch.set_num_threads(args.threads)
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    cfg = ToyConfig(batch=args.batch, hidden=args.hidden)
    trainer, before = toy_trainer(cfg, fuse=False), before_trainer(cfg)
    fusedt = None if args.no_fuse or fused.compiler() is None else toy_trainer(cfg, fuse=True)
    time_ours(trainer, 3)  # warm-up
    time_ours(before, 3)
    if fusedt is not None:
        t0 = time.perf_counter()
        time_ours(fusedt, 1)
        print(f"fused step: first call (compile, or Inductor's cache) {time.perf_counter() - t0:.1f} s")
        time_ours(fusedt, 2)
    world, g = tree("A"), torch.Generator().manual_seed(0)
    sigma = (torch.randn(args.batch, generator=g) * 1.5 - 2.3).exp()
    x = world.sample(args.batch, sigma, generator=g)

    ref = None
    if args.edm2:
        ref = load_reference(args.edm2)
        torch.set_num_threads(args.ref_threads)
        ref.gt("A", torch.device("cpu"))
        time_reference(ref, 1, args.batch, args.hidden)  # warm-up (builds the tree, first-call costs)

    torch.set_num_threads(args.threads)
    matmuls = record_matmuls(before)  # the network's products (and the sampler's), not score_fast's own
    floor = floor_fn(matmuls, args.batch, len(world))
    floor()
    print(f"floor: {len(matmuls)} matrix products per iteration + exp over [{args.batch}, {len(world)}]")
    ours, refs, ratios, scores, floors, fratios, befores, bratios = [], [], [], [], [], [], [], []
    fuseds, furatios = [], []
    for r in range(args.rounds):
        torch.set_num_threads(args.threads)
        # each step is timed right after its floor, so both see the same state of the caches and the allocator
        # (the former loss and the score timings below churn through [batch, 1016] temporaries)
        f = timed_n(floor, args.iters)
        t = time_ours(trainer, args.iters)
        if fusedt is not None:
            f_fused = timed_n(floor, args.iters)
            tf = time_ours(fusedt, args.iters)
        b = time_ours(before, args.iters)
        floors.append(f)
        fratios.append(t / f)
        befores.append(b)
        bratios.append(b / f)
        scores.append(
            (
                timed_n(lambda: world.score_fast(x, sigma), 5),
                timed_n(lambda: world.score(x, sigma), 5),
                timed_n(lambda: world.score_fast(x, sigma, fused=True), 5) if fusedt else float("nan"),
            )
        )
        ours.append(t)
        line = f"round {r + 1}: plain {t * 1e3:7.1f} ms/it ({t / f:5.2f})"
        if fusedt is not None:
            fuseds.append(tf)
            furatios.append(tf / f_fused)
            line += f"   fused {tf * 1e3:7.1f} ms/it ({tf / f_fused:5.2f})"
        line += f"   floor {f * 1e3:6.1f} ms   (before: {b * 1e3:6.1f} ms/it, {b / f:5.2f})"
        if ref is not None:
            torch.set_num_threads(args.ref_threads)
            tr = time_reference(ref, args.ref_iters, args.batch, args.hidden)
            refs.append(tr)
            ratios.append(tr / t)
            line += f"   reference {tr * 1e3:8.1f} ms/it   ratio {tr / t:6.1f}x"
        print(line, flush=True)

    med = statistics.median
    print(f"load average over the last minute: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(
        f"guidelab plain: {med(ours) * 1e3:.1f} ms per iteration (median of {args.rounds} rounds of {args.iters}); "
        f"floor {med(floors) * 1e3:.1f} ms; iteration / floor {med(fratios):.2f} (median per round; "
        f"min {min(fratios):.2f}, max {max(fratios):.2f}); before (full exact score): {med(befores) * 1e3:.1f} ms, "
        f"{med(bratios):.2f} x floor; exact score alone: score_fast {med([a for a, _, _ in scores]) * 1e3:.1f} ms, "
        f"fused {med([c for _, _, c in scores]) * 1e3:.1f} ms, full sum {med([c for _, c, _ in scores]) * 1e3:.1f} ms "
        f"({'wall' if args.wall else 'CPU'} time)"
    )
    if fuseds:
        print(
            f"guidelab fused: {med(fuseds) * 1e3:.1f} ms per iteration; iteration / floor {med(furatios):.2f} "
            f"(median per round; min {min(furatios):.2f}, max {max(furatios):.2f})"
        )
    if args.prefetch:
        prefetched(cfg, args, floors)
    t_net, t_nfloor, n_mm = network_part(trainer, args.batch, args.rounds)
    print(
        f"network score loss alone (forward + backward, fixed batch): {t_net * 1e3:.1f} ms; its {n_mm} matrix "
        f"products alone {t_nfloor * 1e3:.1f} ms; ratio {t_net / t_nfloor:.2f}"
    )
    if ref is not None:
        print(f"reference: {med(refs) * 1e3:.0f} ms per iteration (median of {args.rounds} rounds of {args.ref_iters})")
        print(f"speed-up: {med(ratios):.1f}x (median per-round ratio; min {min(ratios):.1f}x, max {max(ratios):.1f}x)")


if __name__ == "__main__":
    main()
