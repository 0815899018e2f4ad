"""Sampling jobs: samples written in resumable ``.npz`` shards, seeds split over ``torchrun`` ranks.

Seeds ``seed_start .. seed_start + n - 1`` are cut into shards of ``shard_size`` consecutive seeds;
shard *i* is computed by rank ``i % world_size`` in one batch, so a sample depends only on its seed
and the union of shards is bit-identical for any world size. Each shard is written to a temporary
name and renamed (atomic): a killed job leaves finished shards and no partial file, and a rerun
skips the shards that exist. ``job.json`` records the configuration; a rerun with another one is
refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import guidance, samplers, schedules, toy
from ._io import atomic_write
from .errors import GuidelabError, check
from .rng import SampleNoise

GUIDERS = ("none", "cfg", "autoguidance")


@dataclass
class SampleConfig:
    """What to sample. ``world``: an exact tree ("A", "B", "AB") or ``model``: a .safetensors checkpoint.

    Guidance: ``guider`` "none", "cfg" (exact world: uncond = tree("AB"); model: ``guide`` checkpoint as
    the unconditional network, or the model's null label without one) or "autoguidance" (``guide``
    checkpoint). ``w = 1`` is no guidance; ``interval = (lo, hi)`` guides only for lo < sigma <= hi. Schedule: karras(steps, sigma_min, sigma_max, rho).
    """
    world: str | None = "A"
    model: str | None = None
    guide: str | None = None
    guider: str = "none"
    w: float = 1.0
    label: int | None = None
    sampler: str = "heun"
    steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float = 5.0
    rho: float = 7.0
    dtype: str = "float32"
    interval: tuple[float, float] | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        check((self.world is None) != (self.model is None), "give exactly one of world (an exact tree) or model (a checkpoint)")
        check(self.guider in GUIDERS, f"unknown guider {self.guider!r}; allowed: {', '.join(GUIDERS)}")
        check(self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}")
        check(self.guider != "autoguidance" or self.guide is not None, "autoguidance needs a guide checkpoint (--guide)")
        check(self.world is None or self.guider != "autoguidance", "autoguidance on the exact world needs a model; use --model and --guide")
        check(isinstance(self.steps, int) and self.steps >= 2, f"steps must be an integer >= 2, got {self.steps!r}")
        samplers.get(self.sampler)
        for path in (self.model, self.guide):
            check(path is None or Path(path).is_file(), f"checkpoint not found: {path}")
        check(self.interval is None or (len(self.interval) == 2 and 0 <= self.interval[0] < self.interval[1]),
              f"interval must be (lo, hi) with 0 <= lo < hi, got {self.interval!r}")


def build_denoiser(cfg: SampleConfig, device: str | torch.device = "cpu"):
    """(denoiser, sample shape, cond) described by ``cfg``."""
    cfg.validate()
    dtype = getattr(torch, cfg.dtype)
    if cfg.world is not None:
        main = toy.tree(cfg.world, dtype=dtype)
        shape, ref = (main.dim,), (toy.tree("AB", dtype=dtype) if cfg.guider == "cfg" else None)
    else:
        from .training import load_model
        main = load_model(_need(cfg.model), device).to(dtype)
        shape = (main.dim,)
        ref = load_model(_need(cfg.guide), device).to(dtype) if cfg.guide is not None else None
    cond = {} if cfg.label is None else {"label": cfg.label}
    if cfg.guider == "cfg":
        den = guidance.cfg(main, cfg.w, uncond=ref)
    elif cfg.guider == "autoguidance":
        den = guidance.autoguidance(main, ref, cfg.w)
    else:
        den = main
    if cfg.interval is not None and cfg.guider != "none":
        den = guidance.interval(den, float(cfg.interval[0]), float(cfg.interval[1]))
    return den, shape, cond


def _need(path) -> str:
    check(Path(path).is_file(), f"checkpoint not found: {path}")
    return str(path)


def generate(den, shape, cond, cfg: SampleConfig, seeds, device: str | torch.device = "cpu") -> np.ndarray:
    """Samples [len(seeds), *shape] for ``seeds``: x_T = sigma_max * N(0, I) and the sampler's noise
    both from per-seed generators (row i depends only on ``seeds[i]``)."""
    dtype = getattr(torch, cfg.dtype)
    sigmas = schedules.karras(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho, dtype=dtype, device=device)
    noise = SampleNoise(list(seeds), device=device)
    x = noise.randn(shape, dtype) * sigmas[0]
    c = {k: torch.full((len(seeds),), v, dtype=torch.long, device=device) for k, v in cond.items()}
    kw = {"noise": noise} if samplers.info(cfg.sampler).stochastic else {}
    out = samplers.get(cfg.sampler)(den, x, sigmas, cond=c or None, **kw, **cfg.extra)
    return out.cpu().numpy()


def shard_name(start: int, stop: int) -> str:
    return f"shard-{start:09d}-{stop - 1:09d}.npz"


def _dist_context():
    """(rank, world_size, owns_group): from torchrun's environment; gloo on CPU, nccl with CUDA."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), True


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def sample(out: str | os.PathLike, cfg: SampleConfig, *, n: int, seed_start: int = 0, shard_size: int = 1024,
           device: str | None = None, progress: bool = False) -> list[Path]:
    """Write samples of seeds ``seed_start .. seed_start + n - 1`` to ``out/shard-*.npz`` (keys
    ``samples`` [k, *shape], ``seeds`` [k] int64). Resumable; under ``torchrun`` each rank writes its
    share. Returns the paths of all shards of the job (on every rank, once all are written)."""
    check(isinstance(n, int) and n >= 1, f"n must be an integer >= 1, got {n!r}")
    check(isinstance(shard_size, int) and shard_size >= 1, f"shard_size must be an integer >= 1, got {shard_size!r}")
    cfg.validate()
    rank, world, owns = _dist_context()
    device = device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    manifest = {"config": json.loads(json.dumps(asdict(cfg))), "n": n, "seed_start": seed_start, "shard_size": shard_size}
    try:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            job = out / "job.json"
            if job.exists():
                old = json.loads(job.read_text())
                if old != manifest:
                    raise GuidelabError(f"{out} holds another job ({job}); use a new --out or the same settings to resume")
            else:
                atomic_write(job, json.dumps(manifest, indent=1).encode())
        _barrier(world)
        check((out / "job.json").exists() and json.loads((out / "job.json").read_text()) == manifest,
              f"{out} holds another job; use a new --out or the same settings to resume")
        den, shape, cond = build_denoiser(cfg, device)
        starts = list(range(seed_start, seed_start + n, shard_size))
        paths = [out / shard_name(s, min(s + shard_size, seed_start + n)) for s in starts]
        mine = [(s, p) for i, (s, p) in enumerate(zip(starts, paths)) if i % world == rank]
        it = mine
        if progress and rank == 0:
            from tqdm import tqdm
            it = tqdm(mine, desc=f"shards (rank 0 of {world})")
        for s, p in it:
            for stale in out.glob(f".{p.name}.tmp*"):  # left by a killed writer of this shard
                stale.unlink(missing_ok=True)
            if p.exists():
                continue
            seeds = np.arange(s, min(s + shard_size, seed_start + n), dtype=np.int64)
            x = generate(den, shape, cond, cfg, seeds.tolist(), device)
            atomic_write(p, lambda f: np.savez(f, samples=x, seeds=seeds))
        _barrier(world)
    finally:
        if owns:
            import torch.distributed as dist
            dist.destroy_process_group()
    return paths


def load_samples(out: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """All samples and seeds of a job folder, sorted by seed: ([N, ...], [N])."""
    files = sorted(Path(out).glob("shard-*.npz"))
    check(bool(files), f"no shards in {out}")
    parts = [np.load(f) for f in files]
    x = np.concatenate([p["samples"] for p in parts])
    s = np.concatenate([p["seeds"] for p in parts])
    order = np.argsort(s, kind="stable")
    return x[order], s[order]
