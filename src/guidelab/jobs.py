"""Sampling jobs: samples written in resumable ``.npz`` shards, seeds split over ``torchrun`` ranks.

Seeds ``seed_start .. seed_start + n - 1`` are cut into shards of ``shard_size`` consecutive seeds;
shard *i* is computed by rank ``i % world_size`` in one batch, so a sample depends only on its seed
and the union of shards is bit-identical for any world size. Each shard is written to a temporary
name and renamed (atomic): a killed job leaves finished shards and no partial file, and a rerun
skips the shards that exist. ``job.json`` records the configuration; a rerun with another one is
refused.

What is sampled (:class:`SampleConfig`): the exact 2-D world, a toy checkpoint (shape ``[dim]``) or
any guidelab image denoiser (shape ``[C, H, W]`` from its config), a ``.safetensors`` checkpoint or
a training run folder (its post-hoc EMA, :func:`guidelab.training.phema.reconstruct`). Every guider
name maps to one small builder in :data:`BUILDERS`; ``interval`` wraps any of them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import guidance, samplers, schedules, toy
from ._io import atomic_write, to_uint8, write_png
from .errors import GuidelabError, check
from .rng import SampleNoise
from .training.phema import load_network

#: Guiders that combine networks linearly (``D = D_ref + w (D - D_ref)``) or by a gradient.
GUIDERS = ("none", "cfg", "autoguidance", "icg", "tsg", "gft", "distilled", "classifier")


@dataclass
class SampleConfig:
    """What to sample. ``world``: an exact tree ("A", "B", "AB") or ``model``: a checkpoint (.safetensors)
    or a training run folder (post-hoc EMA of ``sigma_rel`` at ``step``, default the last snapshot).

    ``label``: a class (int), ``"balanced"`` (sample *i* gets ``seed_i % num_classes``: per sample, batch
    invariant) or None (no label: the null label of a class-conditional network). ``null_label``: call
    the network with its null label while ``label`` stays the target of classifier guidance (and of
    class accuracy). Guiders (``w = 1``: no guidance):

    * ``none``; ``cfg``: the null label of the same network, or ``guide`` = an unconditional checkpoint
      (exact world: tree("AB"));
    * ``autoguidance``: ``guide`` = a weaker checkpoint or run folder (``guide_sigma_rel``, ``guide_step``);
    * ``icg`` / ``tsg`` (guidance.icg / guidance.tsg, per-sample seeds; ``options``: tsg ``s``, ``alpha``);
    * ``gft``: a recipe=gft network at ``beta = 1/w`` (one evaluation per step);
    * ``distilled``: a student with the scalar input ``w`` (one evaluation per step);
    * ``classifier``: ``guide`` = a noise-aware classifier (default: the cached digits one).

    ``interval = (lo, hi)`` guides only for lo < sigma <= hi. Schedule: karras(steps, sigma_min,
    sigma_max, rho); ``sigma_max`` None is 80 for image networks (EDM) and 5 otherwise; a checkpoint
    that carries its own grid (``meta.distilled.sigmas``, progressive distillation) is sampled on exactly that
    grid (``sampler`` None: euler there, heun otherwise). ``chunk``: networks see blocks of this many
    rows, each sample in the row ``seed % chunk``, so samples do not depend on the shard size (see
    :class:`Counted`; 0: off; shards that are multiples of ``chunk`` waste nothing).
    """
    world: str | None = "A"
    model: str | None = None
    guide: str | None = None
    guider: str = "none"
    w: float = 1.0
    label: int | str | None = None
    null_label: bool = False
    sampler: str | None = None
    steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float | None = None
    rho: float = 7.0
    dtype: str = "float32"
    interval: tuple[float, float] | None = None
    sigma_rel: float = 0.10
    step: int | None = None
    guide_sigma_rel: float = 0.10
    guide_step: int | None = None
    chunk: int = 64
    options: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        check((self.world is None) != (self.model is None), "give exactly one of world (an exact tree) or model (a checkpoint)")
        check(self.guider in GUIDERS, f"unknown guider {self.guider!r}; allowed: {', '.join(GUIDERS)}")
        check(self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}")
        check(self.guider not in ("autoguidance",) or self.guide is not None, "autoguidance needs a guide checkpoint (--guide)")
        check(self.world is None or self.guider in ("none", "cfg"),
              f"guider {self.guider} needs a model; on the exact world use none or cfg")
        check(isinstance(self.steps, int) and self.steps >= 2, f"steps must be an integer >= 2, got {self.steps!r}")
        check(isinstance(self.chunk, int) and self.chunk >= 0, f"chunk must be an integer >= 0, got {self.chunk!r}")
        check(self.label is None or self.label == "balanced" or (isinstance(self.label, int) and not isinstance(self.label, bool)
                                                                 and self.label >= 0),
              f"label must be a class index >= 0, 'balanced' or None, got {self.label!r}")
        check(not self.null_label or self.guider in ("none", "autoguidance", "tsg", "classifier"),
              f"null_label works with none, autoguidance, tsg and classifier, not {self.guider}")
        if self.sampler is not None:
            samplers.get(self.sampler)
        for path in (self.model, self.guide):
            check(path is None or Path(path).exists(), f"checkpoint not found: {path}")
        check(self.interval is None or (len(self.interval) == 2 and 0 <= self.interval[0] < self.interval[1]),
              f"interval must be (lo, hi) with 0 <= lo < hi, got {self.interval!r}")


def network_info(net) -> dict:
    """What a result records about a loaded network: class, step, post-hoc EMA and recipe."""
    info = getattr(net, "checkpoint_info", {}) or {}
    meta = info.get("meta") or {}
    out = {"model": (info.get("model") or {}).get("name"), "step": info.get("step"), "sigma_rel": info.get("sigma_rel"),
           "recipe": meta.get("recipe") if isinstance(meta, dict) else None}
    if "phema_error" in info:
        out["phema_error"] = info["phema_error"]
    return out


class Counted:
    """A network that counts the rows it evaluates (``counts[key]``); other attributes pass through.

    Batch invariance (``chunk`` > 0 and ``seeds`` set, one per sample of the batch being sampled): GEMM
    and convolution kernels may round a row differently depending on the batch shape and on the row's
    place in it. So the network only ever sees blocks of ``chunk`` rows, and the sample of seed ``s``
    always sits in row ``s % chunk`` of its block (branches that a guider batches, ``[k B]`` rows, get
    their own blocks; unused rows are zeros, their outputs dropped and not counted). A sample then does
    not depend on the shard size, at the cost of partly empty blocks when shards are not multiples of
    ``chunk``. Other calls (no seeds, or rows that are not whole copies of the batch) run as one batch.
    """

    def __init__(self, net, counts: dict, key: str, chunk: int = 0):
        self.net, self.counts, self.key, self.chunk, self.seeds = net, counts, key, chunk, None
        counts.setdefault(key, 0)

    def __call__(self, x, sigma, *args, **cond):
        R, seeds, C = x.shape[0], self.seeds, self.chunk
        self.counts[self.key] += R
        if not C or seeds is None or R % len(seeds) or len(set(seeds)) != len(seeds):
            return self.net(x, sigma, *args, **cond)
        B, dev = len(seeds), x.device
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=dev).expand(R)
        groups: dict[tuple[int, int], list[int]] = {}
        for r in range(R):                                      # block (branch, seed // C), row seed % C
            groups.setdefault((r // B, seeds[r % B] // C), []).append(r)
        parts, order = [], []
        for rows in groups.values():
            rows_t = torch.tensor(rows, device=dev)
            slots = torch.tensor([seeds[r % B] % C for r in rows], device=dev)
            idx = torch.full((C,), rows[0], device=dev, dtype=torch.long).index_put((slots,), rows_t)
            real = torch.zeros(C, dtype=torch.bool, device=dev).index_put((slots,), torch.tensor(True, device=dev))
            xb = torch.where(real.reshape((-1,) + (1,) * (x.ndim - 1)), x[idx], x.new_zeros(()))  # no gradient to padding
            cb = {k: v[idx] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == R else v for k, v in cond.items()}
            parts.append(self.net(xb, sigma[idx], *args, **cb)[slots])
            order.append(rows_t)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]

    def __getattr__(self, name):
        return getattr(self.net, name)


@dataclass
class Parts:
    """What a guider builder gets: the (counted) networks, the weight and the shard's seeds."""
    cfg: SampleConfig
    main: Callable
    guide: Callable | None
    seeds: list[int]

    @property
    def scalar(self) -> str | None:
        return getattr(self.main, "extra_scalar", None)


def _plain(p: Parts, what: str) -> None:
    check(p.scalar is None, f"{what} needs a network without an extra scalar input; {p.cfg.model} has "
          f"{p.scalar!r} (use --guider {'gft' if p.scalar == 'beta' else 'distilled'})")


def _one_pass(fn, net, w):
    """A one-evaluation denoiser at weight ``w`` whose ``unguided`` (for intervals) is the same at w = 1."""
    den = fn(net, w)
    den.unguided = fn(net, 1.0)
    return den


def _gft_fn(net, w):
    from .training.gft import gft_denoiser
    return gft_denoiser(net, w)


def distilled_meta(net) -> dict:
    """A distilled student's ``meta.distilled`` ({} for other networks): see
    :func:`guidelab.training.distill.distilled_info` (a progressive student carries its sigma grid)."""
    from .training.distill import distilled_info
    return distilled_info(net) or {}


def _distilled_fn(net, w):
    from .training.distill import distilled_denoiser
    return distilled_denoiser(net, w, key=distilled_meta(net).get("key") or "w")


def _none(p: Parts):
    if p.scalar == "beta":                                       # a GFT network at w = 1 is the conditional model
        return _gft_fn(p.main, 1.0)
    if p.scalar is not None:
        return _distilled_fn(p.main, 1.0)
    return p.main


def _cfg(p: Parts):
    if p.guide is None:
        _plain(p, "cfg")
        check(getattr(p.main, "null_label", None) is not None,
              f"cfg on {p.cfg.model} needs a class-conditional network (null label) or an unconditional checkpoint as --guide")
    return guidance.cfg(p.main, p.cfg.w, uncond=p.guide)


def _autoguidance(p: Parts):
    _plain(p, "autoguidance")
    return guidance.autoguidance(p.main, p.guide, p.cfg.w)


def _icg(p: Parts):
    _plain(p, "icg")
    return guidance.icg(p.main, p.cfg.w, seeds=p.seeds, **p.cfg.options)


def _tsg(p: Parts):
    _plain(p, "tsg")
    check(getattr(p.main, "noise_cond", True), f"tsg perturbs the noise-level input; {p.cfg.model} has none (noise_cond=false)")
    return guidance.tsg(p.main, p.cfg.w, seeds=p.seeds, **p.cfg.options)


def _gft(p: Parts):
    check(p.scalar == "beta", f"guider gft needs a checkpoint trained with recipe=gft (extra scalar 'beta'); "
          f"{p.cfg.model} has {p.scalar!r}")
    return _one_pass(_gft_fn, p.main, p.cfg.w)


def _distilled(p: Parts):
    key = distilled_meta(p.main).get("key") or "w"
    check(p.scalar == key, f"guider distilled needs a distilled student (extra scalar {key!r}); {p.cfg.model} has {p.scalar!r}")
    return _one_pass(_distilled_fn, p.main, p.cfg.w)


def _classifier(p: Parts):
    _plain(p, "classifier guidance")
    check(p.cfg.label is not None, "classifier guidance needs a target class: --label N or balanced")
    return guidance.classifier(p.main, p.guide, p.cfg.w, pass_label=not p.cfg.null_label)


#: guider name -> builder(Parts) -> denoiser.
BUILDERS: dict[str, Callable[[Parts], Callable]] = {
    "none": _none, "cfg": _cfg, "autoguidance": _autoguidance, "icg": _icg, "tsg": _tsg, "gft": _gft,
    "distilled": _distilled, "classifier": _classifier}


class Sampling:
    """The networks of a :class:`SampleConfig`, loaded once; :meth:`generate` samples given seeds.

    ``counts``: rows evaluated per network since the last :meth:`reset` (``model``, ``guide``,
    ``classifier``); NFE per sample = (model + guide rows) / samples.
    """

    def __init__(self, cfg: SampleConfig, device: str | torch.device = "cpu"):
        cfg.validate()
        self.cfg, self.device, self.counts = cfg, device, {}
        dtype = self.dtype = getattr(torch, cfg.dtype)
        grid = None
        self.num_classes = 0
        if cfg.world is not None:
            self.net = toy.tree(cfg.world, dtype=dtype)
            self.shape, self.image = (self.net.dim,), False
            guide = toy.tree("AB", dtype=dtype) if cfg.guider == "cfg" else None
        else:
            self.net = load_network(cfg.model, cfg.sigma_rel, cfg.step, device).to(dtype)
            self.image = hasattr(self.net, "img_resolution")
            r = getattr(self.net, "img_resolution", None)
            self.shape = (self.net.img_channels, r, r) if self.image else (self.net.dim,)
            self.num_classes = int(getattr(self.net, "num_classes", 0) or 0)
            grid = distilled_meta(self.net).get("sigmas")
            guide = None
            if cfg.guider == "classifier":
                guide = self._classifier()
            elif cfg.guide is not None:
                guide = load_network(cfg.guide, cfg.guide_sigma_rel, cfg.guide_step, device).to(dtype)
        if cfg.label is not None:
            check(self.num_classes > 0 or cfg.guider == "classifier",
                  f"{cfg.model or cfg.world} is unconditional: it takes no --label")
            n_cls = self.num_classes or getattr(guide, "num_classes", 0)
            check(cfg.label == "balanced" or cfg.label < n_cls, f"label {cfg.label} out of range: {n_cls} classes")
        chunk = cfg.chunk if cfg.world is None else 0           # the exact world uses no GEMM
        self.main = Counted(self.net, self.counts, "model", chunk)
        self.guide = None if guide is None else Counted(guide, self.counts, "classifier" if cfg.guider == "classifier" else "guide", chunk)
        self.sampler = cfg.sampler or (distilled_meta(self.net).get("sampler") or "euler" if grid is not None else "heun")
        if grid is not None:
            self.sigmas = torch.tensor(grid, dtype=dtype, device=device)
            self.schedule = f"checkpoint grid ({len(grid) - 1} steps)"
        else:
            sigma_max = cfg.sigma_max if cfg.sigma_max is not None else (80.0 if self.image else 5.0)
            self.sigmas = schedules.karras(cfg.steps, cfg.sigma_min, sigma_max, cfg.rho, dtype=dtype, device=device)
            self.schedule = f"karras({cfg.steps}, {cfg.sigma_min:g}, {sigma_max:g}, rho={cfg.rho:g})"
        self.denoiser([0])                                      # build once: a bad guider fails before sampling

    def _classifier(self):
        from .models.digits import DigitsClassifier, digits_classifier
        cfg = self.cfg
        if cfg.guide is None:
            check(self.shape == (1, 8, 8), "classifier guidance without --guide uses the digits classifier: needs a 1x8x8 model")
            return digits_classifier(noise_aware=True).to(self.device, self.dtype)
        clf = load_network(cfg.guide, device=self.device)
        check(getattr(clf, "noise_aware", False) or not isinstance(clf, DigitsClassifier),
              f"{cfg.guide} is a clean classifier; classifier guidance needs a noise-aware one (guidelab classifier --noise-aware)")
        return clf.to(self.dtype)

    def labels(self, seeds) -> torch.Tensor | None:
        """Target labels [k] of ``seeds`` (None without a label)."""
        lab = self.cfg.label
        if lab is None:
            return None
        s = torch.as_tensor(list(seeds), dtype=torch.long)
        n_cls = self.num_classes or getattr(self.guide, "num_classes", 1)
        return s % n_cls if lab == "balanced" else torch.full_like(s, int(lab))

    def denoiser(self, seeds):
        """The guided denoiser for one batch of ``seeds`` (icg / tsg draw per-sample noise from them)."""
        den = BUILDERS[self.cfg.guider](Parts(self.cfg, self.main, self.guide, [int(s) for s in seeds]))
        if self.cfg.interval is not None and self.cfg.guider != "none":
            den = guidance.interval(den, float(self.cfg.interval[0]), float(self.cfg.interval[1]))
        return den

    def reset(self) -> None:
        for k in self.counts:
            self.counts[k] = 0

    @torch.no_grad()
    def generate(self, seeds) -> np.ndarray:
        """Samples [len(seeds), *shape] (raw, not clipped): x_T = sigma_max * N(0, I) and the sampler's noise
        from per-seed generators, so row i depends only on ``seeds[i]``."""
        seeds = [int(s) for s in seeds]
        noise = SampleNoise(seeds, device=self.device)
        x = noise.randn(self.shape, self.dtype) * self.sigmas[0]
        cond = {}
        labels = self.labels(seeds)
        if labels is not None and (not self.cfg.null_label or self.cfg.guider == "classifier"):
            cond["label"] = labels.to(self.device)
        kw = {"noise": noise} if samplers.info(self.sampler).stochastic else {}
        nets = [n for n in (self.main, self.guide) if n is not None]
        for n in nets:
            n.seeds = seeds
        try:
            out = samplers.get(self.sampler)(self.denoiser(seeds), x, self.sigmas, cond=cond or None, **kw, **self.cfg.extra)
        finally:
            for n in nets:
                n.seeds = None
        return out.cpu().numpy()

    def describe(self) -> dict:
        """Sampler, grid, guider and networks, for results files."""
        cfg = self.cfg
        d = {"sampler": self.sampler, "schedule": self.schedule, "steps": len(self.sigmas) - 1,
             "guider": cfg.guider, "w": cfg.w, "interval": list(cfg.interval) if cfg.interval else None,
             "label": cfg.label, "null_label": cfg.null_label, "options": cfg.options, "world": cfg.world}
        if cfg.model is not None:
            d["model"] = {"path": str(cfg.model), **network_info(self.net)}
        if self.guide is not None and cfg.world is None:
            d["guide"] = {"path": str(cfg.guide) if cfg.guide else "cached digits classifier (noise-aware)",
                          **network_info(self.guide.net)}
        return d


def build(cfg: SampleConfig, device: str | torch.device = "cpu") -> Sampling:
    """Load the networks of ``cfg`` (validated; a bad guider or checkpoint is a one-line error)."""
    return Sampling(cfg, device)


def build_balanced(cfg: SampleConfig, device: str | torch.device = "cpu", *, classifier: bool = False) -> Sampling:
    """:func:`build` where an unset label means ``"balanced"`` for class-conditional models and for
    classifier guidance (``classifier``: also when the guider is another one; what evaluate and sweep
    default to); ``.cfg`` of the result is the configuration used."""
    if cfg.label is None and (classifier or cfg.guider == "classifier"):
        cfg = replace(cfg, label="balanced")
    job = build(cfg, device)
    if cfg.label is None and job.num_classes:
        job.cfg = replace(cfg, label="balanced")
    return job


def shard_name(start: int, stop: int) -> str:
    return f"shard-{start:09d}-{stop - 1:09d}.npz"


def png_path(out: str | os.PathLike, seed: int) -> Path:
    """Where ``sample(..., png=True)`` writes the image of ``seed``: ``out/png/<seed:09d>.png``."""
    return Path(out) / "png" / f"{int(seed):09d}.png"


def _write_pngs(out: Path, seeds, x: np.ndarray) -> None:
    """The PNG of each sample that has none yet (a killed job may have written some of a shard's)."""
    for seed, im in zip(seeds, to_uint8(x)):
        if not png_path(out, seed).exists():
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


def sample(out: str | os.PathLike, cfg: SampleConfig, *, n: int, seed_start: int = 0, shard_size: int = 1024,
           device: str | None = None, progress: bool = False, png: bool = False,
           job: Sampling | None = None) -> list[Path]:
    """Write samples of seeds ``seed_start .. seed_start + n - 1`` to ``out/shard-*.npz`` (keys
    ``samples`` [k, *shape] raw, ``seeds`` [k] int64, ``labels`` [k] when labelled, ``info`` a JSON
    string: rows evaluated per network and seconds). ``png`` (images only): also one PNG per sample,
    ``out/png/<seed>.png`` (written before the shard, each atomically; a resumed job writes missing
    ones from existing shards). Resumable; under ``torchrun`` each rank writes its share. Returns the
    paths of all shards of the job (on every rank, once all are written). ``job``: ``build(cfg)`` if
    already loaded."""
    check(isinstance(n, int) and n >= 1, f"n must be an integer >= 1, got {n!r}")
    check(isinstance(shard_size, int) and shard_size >= 1, f"shard_size must be an integer >= 1, got {shard_size!r}")
    cfg.validate()
    rank, world, owns = _dist_context()
    device = device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    manifest = {"config": json.loads(json.dumps(asdict(cfg))), "n": n, "seed_start": seed_start, "shard_size": shard_size}
    try:
        job = job or build(cfg, device)                          # before any file: a refused job writes nothing
        check(not png or job.image, "--png needs an image model (samples of shape [C, H, W])")
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            jf = out / "job.json"
            if jf.exists():
                old = json.loads(jf.read_text())
                if old != manifest:
                    raise GuidelabError(f"{out} holds another job ({jf}); use a new --out or the same settings to resume")
            else:
                atomic_write(jf, json.dumps(manifest, indent=1).encode())
        _barrier(world)
        check((out / "job.json").exists() and json.loads((out / "job.json").read_text()) == manifest,
              f"{out} holds another job; use a new --out or the same settings to resume")
        starts = list(range(seed_start, seed_start + n, shard_size))
        paths = [out / shard_name(s, min(s + shard_size, seed_start + n)) for s in starts]
        mine = [(s, p) for i, (s, p) in enumerate(zip(starts, paths)) if i % world == rank]
        it = mine
        if progress and rank == 0:
            from tqdm import tqdm
            it = tqdm(mine, desc=f"shards (rank 0 of {world})")
        for s, p in it:
            seeds = np.arange(s, min(s + shard_size, seed_start + n), dtype=np.int64)
            stale = list(out.glob(f".{p.name}.tmp*"))            # left by a killed writer of this shard
            if png:
                names = {f".{png_path(out, seed).name}.tmp" for seed in seeds}
                stale += [t for t in (out / "png").glob(".*.tmp*") if t.name[:t.name.index(".tmp") + 4] in names]
            for f in stale:
                f.unlink(missing_ok=True)
            if p.exists():
                if png:
                    _write_pngs(out, seeds, np.load(p)["samples"])
                continue
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
    return {"samples": np.concatenate([p["samples"] for p in parts])[order], "seeds": s[order], "labels": labels,
            "rows": rows, "seconds": seconds}


def load_samples(out: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """All samples and seeds of a job folder, sorted by seed: ([N, ...], [N])."""
    d = load_shards(out)
    return d["samples"], d["seeds"]
