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
from typing import Any

import numpy as np
import torch

from ..._io import atomic_write, file_lock, png_name, stale_temps, to_uint8
from ...errors import GuidelabError, check
from ...log import get_logger, release
from .. import provenance
from .assembly import Sampling, build, ems_file
from .config import SampleConfig

log = get_logger(__name__)

#: The folder lock of a job (job.json is created or compared under it).
LOCK = ".job.lock"
#: Progress bars over samples: count, rate and ETA.
BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} samples [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
#: Seeds are int64 (shards, torch generators): seed_start + n must stay below 2^63.
SEED_LIMIT = 2**63


def shard_name(start: int, stop: int) -> str:
    return f"shard-{start:09d}-{stop - 1:09d}.npz"


def png_path(out: str | os.PathLike, seed: int) -> Path:
    """Where ``sample(..., png=True)`` writes the image of ``seed``: ``out/png/<seed:09d>.png`` (:func:`png_name`)."""
    return Path(out) / "png" / png_name(seed)


def _write_pngs(out: Path, seeds, x: np.ndarray, prov: dict | None = None) -> None:
    """The PNG of each sample that has none yet (a killed job may have written some of a shard's), with
    the job's provenance and the sample's seed in its text chunks."""
    for seed, im in zip(seeds, to_uint8(x)):
        if not (png_path(out, seed).exists() and _png_ok(png_path(out, seed))):
            provenance.write_png(png_path(out, seed), im, None if prov is None else {**prov, "seeds": str(int(seed))})


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
    """sha256 of every model / guide file the job reads (a run folder: all its files) and of DPM-Solver-v3's
    statistics file (:func:`~.assembly.ems_file`), for job.json (a resume with a changed file is refused)."""
    files = (("model", cfg.model), ("guide", cfg.guide), ("ems", ems_file(cfg)))
    return {k: provenance.file_sha256(p) for k, p in files if p is not None}


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
        check(
            _comparable(old) == _comparable(manifest),
            f"{out} holds another job ({jf}){_difference(old, manifest)}; use a new --out or the same settings to resume",
        )


def _comparable(manifest: dict) -> dict:
    """What a resume compares: everything but ``provenance`` (the command line and the machine may differ)."""
    return {k: v for k, v in manifest.items() if k != "provenance"}


def _difference(old: dict, new: dict) -> str:
    """`` (weight: 2 there, linear:1-4 here)``: the first setting that differs, for the refusal message."""
    a, b = old.get("config"), new.get("config")
    if isinstance(a, dict) and isinstance(b, dict):
        for k in b:
            if a.get(k) != b.get(k):
                return f" ({k}: {a.get(k)!r} there, {b.get(k)!r} here)"
    for k in ("n", "seed_start", "shard_size"):
        if old.get(k) != new.get(k):
            return f" ({k}: {old.get(k)!r} there, {new.get(k)!r} here)"
    return ""


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


def _write_shard(out: Path, p: Path, seeds: np.ndarray, job: Sampling, png: bool, bar=None, prov: dict | None = None) -> None:
    """Shard ``p`` (and its PNGs) unless a whole one is there; the caller holds the shard's lock. ``bar``:
    a progress bar over samples, advanced per sampler step."""
    for f in stale_temps(out, p.name) + [t for seed in seeds if png for t in stale_temps(out / "png", png_path(out, seed).name)]:
        f.unlink(missing_ok=True)  # left by a killed writer of this shard
    if p.exists() and _shard_ok(p, seeds, job.shape):
        if png:
            _write_pngs(out, seeds, np.load(p)["samples"], prov)
        if bar is not None:
            bar.update(len(seeds))
        return
    job.reset()
    t = time.perf_counter()
    steps = len(job.sigmas) - 1
    done = [0]

    def step(info):
        target = len(seeds) * min(int(info.get("i", 0)) + 1, steps) // steps  # whole samples: totals add up exactly
        if bar is not None and target > done[0]:
            bar.update(target - done[0])
            done[0] = target

    x = job.generate(seeds.tolist(), callback=step if bar is not None else None)
    if bar is not None and len(seeds) > done[0]:
        bar.update(len(seeds) - done[0])  # rounding; samplers that skip a callback
    info = {"rows": dict(job.counts), "seconds": time.perf_counter() - t}
    if png:
        _write_pngs(out, seeds, x, prov)
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
    progress: bool | Any = False,
    png: bool = False,
    job: Sampling | None = None,
) -> list[Path]:
    """Write samples of seeds ``seed_start .. seed_start + n - 1`` to ``out/shard-*.npz`` (keys
    ``samples`` [k, *shape] raw, ``seeds`` [k] int64, ``labels`` [k] when labelled, ``info`` a JSON
    string: rows evaluated per network and seconds). ``png`` (images only): also one PNG per sample,
    ``out/png/<seed>.png`` (written before the shard, each atomically; a resumed job writes missing
    ones from existing shards). Resumable; under ``torchrun`` each rank writes its share. Returns the
    paths of all shards of the job (on every rank, once all are written). ``job``: ``build(cfg)`` if
    already loaded. ``progress``: a bar over samples (with ETA) on rank 0, advanced per sampler step; or
    an existing tqdm bar to advance (a sweep's bar over all its cells). ``job.json`` also records the
    provenance (:mod:`guidelab.app.provenance`), which a resume does not compare.

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
    bar = None
    try:
        job = job or build(cfg, device)  # before any file: a refused job writes nothing
        check(not png or job.image, "--png needs an image model (samples of shape [C, H, W])")
        job.probe()
        manifest["provenance"] = provenance.of_job(job, seeds=range(seed_start, seed_start + n), device=device)
        if rank == 0:
            _claim(out, manifest)
        _barrier(world)
        check(
            (out / "job.json").exists() and _comparable(json.loads((out / "job.json").read_text())) == _comparable(manifest),
            f"{out} holds another job; use a new --out or the same settings to resume",
        )
        starts = list(range(seed_start, seed_start + n, shard_size))
        if rank == 0 and world > len(starts):
            log.warning(
                "warning: %d shard%s for %d ranks: ranks %d..%d get no work; use --shard-size %d or less "
                "(at most n / ranks = %d samples per shard)",
                len(starts),
                "" if len(starts) == 1 else "s",
                world,
                len(starts),
                world - 1,
                max(1, n // world),
                max(1, n // world),
            )
        paths = [out / shard_name(s, min(s + shard_size, seed_start + n)) for s in starts]
        mine = [(s, p) for i, (s, p) in enumerate(zip(starts, paths)) if i % world == rank]
        busy = []
        if rank == 0 and progress is not False and progress is not None:
            if hasattr(progress, "update"):
                bar = progress
            else:
                release()  # held phase lines first, then the bar
                from tqdm.auto import tqdm

                total = sum(min(s + shard_size, seed_start + n) - s for s, _ in mine)
                desc = "sampling" + (f" (rank 0 of {world})" if world > 1 else "")
                bar = tqdm(total=total, desc=desc, unit="sample", bar_format=BAR)
        prov = manifest["provenance"] if png else None
        for s, p in mine:
            seeds = np.arange(s, min(s + shard_size, seed_start + n), dtype=np.int64)
            with file_lock(out / f".{p.name}.lock", blocking=False) as mine_now:
                if mine_now:
                    _write_shard(out, p, seeds, job, png, bar, prov)
                else:
                    busy.append((p, seeds))  # another writer is on it
        for p, seeds in busy:  # wait for it, then check (redo if it died)
            with file_lock(out / f".{p.name}.lock"):
                _write_shard(out, p, seeds, job, png, bar, prov)
        _barrier(world)
    finally:
        if bar is not None and bar is not progress:
            bar.close()
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
