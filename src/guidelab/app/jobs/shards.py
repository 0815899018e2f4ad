"""Sampling jobs on disk: samples written in resumable ``.npz`` shards, seeds split over ``torchrun`` ranks.

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
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..._io import atomic_write, file_lock, sha256, stale_temps, to_uint8, write_png
from ...errors import GuidelabError, check
from .assembly import Sampling, build
from .config import SampleConfig

#: The folder lock of a job (job.json is created or compared under it).
LOCK = ".job.lock"
#: Seeds are int64 (shards, torch generators): seed_start + n must stay below 2^63.
SEED_LIMIT = 2**63


def shard_name(start: int, stop: int) -> str:
    return f"shard-{start:09d}-{stop - 1:09d}.npz"


def png_path(out: str | os.PathLike, seed: int) -> Path:
    """Where ``sample(..., png=True)`` writes the image of ``seed``: ``out/png/<seed:09d>.png``."""
    return Path(out) / "png" / f"{int(seed):09d}.png"


def _write_pngs(out: Path, seeds, x: np.ndarray) -> None:
    """The PNG of each sample that has none yet (a killed job may have written some of a shard's)."""
    for seed, im in zip(seeds, to_uint8(x)):
        if not (png_path(out, seed).exists() and _png_ok(png_path(out, seed))):
            write_png(png_path(out, seed), im)


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


def _inputs(cfg: SampleConfig) -> dict:
    """sha256 of every model / guide file the job reads (a run folder: all its files), for job.json."""
    return {k: sha256(p) for k, p in (("model", cfg.model), ("guide", cfg.guide)) if p is not None}


def _claim(out: Path, manifest: dict) -> None:
    """Create ``out/job.json`` or check that it is this job, under the folder's lock (never two jobs in one folder)."""
    jf = out / "job.json"
    if jf.exists():
        _same_job(jf, manifest)  # a refused job touches nothing, not even the lock
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / LOCK):
        if not jf.exists():
            atomic_write(jf, json.dumps(manifest, indent=1).encode())
            return
        _same_job(jf, manifest)


def _same_job(jf: Path, manifest: dict) -> None:
    out = jf.parent
    if True:
        try:
            old = json.loads(jf.read_text())
        except ValueError:
            raise GuidelabError(f"{jf} is not a job file (not JSON); use a new --out") from None
        check(isinstance(old, dict), f"{jf} is not a job file; use a new --out")
        changed = [
            k
            for k, h in manifest["inputs"].items()
            if old.get("config") == manifest["config"] and (old.get("inputs") or {}).get(k) not in (None, h)
        ]
        check(
            not changed,
            f"the {changed[0] if changed else ''} file changed since this job began (sha256 differs from "
            f"{jf}); restore it or use a new --out",
        )
        check(old == manifest, f"{out} holds another job ({jf}); use a new --out or the same settings to resume")


def _shard_ok(p: Path, seeds: np.ndarray, shape: tuple) -> bool:
    """Whether shard ``p`` reads back whole with exactly ``seeds`` and samples of ``shape``."""
    try:
        with np.load(p) as d:
            return np.array_equal(d["seeds"], seeds) and d["samples"].shape == (len(seeds), *shape)
    except Exception:  # truncated / garbled file: redo it
        return False


def _png_ok(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def _write_shard(out: Path, p: Path, seeds: np.ndarray, job: Sampling, png: bool) -> None:
    """Shard ``p`` (and its PNGs) unless a whole one is there; the caller holds the shard's lock."""
    for f in stale_temps(out, p.name) + [t for seed in seeds if png for t in stale_temps(out / "png", png_path(out, seed).name)]:
        f.unlink(missing_ok=True)  # left by a killed writer of this shard
    if p.exists() and _shard_ok(p, seeds, job.shape):
        if png:
            _write_pngs(out, seeds, np.load(p)["samples"])
        return
    job.reset()
    t = time.perf_counter()
    x = job.generate(seeds.tolist())
    info = {"rows": dict(job.counts), "seconds": time.perf_counter() - t}
    if png:
        _write_pngs(out, seeds, x)
    labels = job.labels(seeds.tolist())
    arrays = {"samples": x, "seeds": seeds, "info": np.array(json.dumps(info))}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    atomic_write(p, lambda f, a=arrays: np.savez(f, **a))


def sample(
    out: str | os.PathLike,
    cfg: SampleConfig,
    *,
    n: int,
    seed_start: int = 0,
    shard_size: int = 1024,
    device: str | None = None,
    progress: bool = False,
    png: bool = False,
    job: Sampling | None = None,
) -> list[Path]:
    """Write samples of seeds ``seed_start .. seed_start + n - 1`` to ``out/shard-*.npz`` (keys
    ``samples`` [k, *shape] raw, ``seeds`` [k] int64, ``labels`` [k] when labelled, ``info`` a JSON
    string: rows evaluated per network and seconds). ``png`` (images only): also one PNG per sample,
    ``out/png/<seed>.png`` (written before the shard, each atomically; a resumed job writes missing
    ones from existing shards). Resumable; under ``torchrun`` each rank writes its share. Returns the
    paths of all shards of the job (on every rank, once all are written). ``job``: ``build(cfg)`` if
    already loaded.

    Reliability (docs/RELIABILITY.md): everything is checked (one guided denoiser call included) before
    the first write, so a refused job leaves ``out`` as it was; ``job.json`` records the sha256 of the
    model and guide files and a resume with a changed file is refused; an existing shard is skipped only
    if it reads back whole with its seeds; writers on one ``out`` (other processes, other ranks) take
    shards under per-shard ``flock`` locks, so they share the work and never write the same shard twice."""
    int_ = (int, np.integer)
    check(isinstance(n, int_) and not isinstance(n, bool) and n >= 1, f"n must be an integer >= 1, got {n!r}")
    check(isinstance(shard_size, int_) and shard_size >= 1, f"shard_size must be an integer >= 1, got {shard_size!r}")
    check(
        isinstance(seed_start, int_) and not isinstance(seed_start, bool) and 0 <= seed_start and seed_start + n <= SEED_LIMIT,
        f"seeds must be integers in [0, 2^63): seed_start={seed_start!r}, n={n}",
    )
    n, shard_size, seed_start = int(n), int(shard_size), int(seed_start)
    cfg.validate()
    rank, world, owns = _dist_context()
    device = device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    check(not out.exists() or out.is_dir(), f"--out {out} exists and is not a folder")
    manifest = {
        "config": json.loads(json.dumps(asdict(cfg))),
        "n": n,
        "seed_start": seed_start,
        "shard_size": shard_size,
        "inputs": _inputs(cfg),
    }
    try:
        job = job or build(cfg, device)  # before any file: a refused job writes nothing
        check(not png or job.image, "--png needs an image model (samples of shape [C, H, W])")
        job.probe()
        if rank == 0:
            _claim(out, manifest)
        _barrier(world)
        check(
            (out / "job.json").exists() and json.loads((out / "job.json").read_text()) == manifest,
            f"{out} holds another job; use a new --out or the same settings to resume",
        )
        starts = list(range(seed_start, seed_start + n, shard_size))
        paths = [out / shard_name(s, min(s + shard_size, seed_start + n)) for s in starts]
        mine = [(s, p) for i, (s, p) in enumerate(zip(starts, paths)) if i % world == rank]
        busy = []
        it = mine
        if progress and rank == 0:
            from tqdm import tqdm

            it = tqdm(mine, desc=f"shards (rank 0 of {world})")
        for s, p in it:
            seeds = np.arange(s, min(s + shard_size, seed_start + n), dtype=np.int64)
            with file_lock(out / f".{p.name}.lock", blocking=False) as mine_now:
                if mine_now:
                    _write_shard(out, p, seeds, job, png)
                else:
                    busy.append((p, seeds))  # another writer is on it
        for p, seeds in busy:  # wait for it, then check (redo if it died)
            with file_lock(out / f".{p.name}.lock"):
                _write_shard(out, p, seeds, job, png)
        _barrier(world)
    finally:
        if owns:
            import torch.distributed as dist

            dist.destroy_process_group()
    return paths


def load_shards(out: str | os.PathLike) -> dict:
    """All shards of a job folder sorted by seed: ``samples`` [N, ...], ``seeds`` [N], ``labels`` [N] or
    None, ``rows`` (network rows summed over shards) and ``seconds`` (sampling time summed)."""
    files = sorted(Path(out).glob("shard-*.npz"))
    check(bool(files), f"no shards in {out}")
    parts = [np.load(f) for f in files]
    s = np.concatenate([p["seeds"] for p in parts])
    order = np.argsort(s, kind="stable")
    rows: dict[str, int] = {}
    seconds = 0.0
    for p in parts:
        if "info" in p.files:
            info = json.loads(str(p["info"]))
            seconds += info["seconds"]
            for k, v in info["rows"].items():
                rows[k] = rows.get(k, 0) + v
    labels = np.concatenate([p["labels"] for p in parts])[order] if all("labels" in p.files for p in parts) else None
    return {
        "samples": np.concatenate([p["samples"] for p in parts])[order],
        "seeds": s[order],
        "labels": labels,
        "rows": rows,
        "seconds": seconds,
    }


def load_samples(out: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """All samples and seeds of a job folder, sorted by seed: ([N, ...], [N])."""
    d = load_shards(out)
    return d["samples"], d["seeds"]
