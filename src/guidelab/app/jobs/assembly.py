"""Assembling a sampling job: the networks of a :class:`~.config.SampleConfig` loaded once, counted and
run in fixed blocks (:class:`Counted`), the guider built by the guider registry (:func:`build`)."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

from ... import samplers, schedules, toy
from ...errors import GuidelabError, check
from ...guidance import registry
from ...log import get_logger
from ...rng import SampleNoise
from ...training.phema import load_network, snapshots
from ...training.student import distilled_info
from .config import SampleConfig, check_sampler_options

log = get_logger(__name__)
#: A post-hoc EMA reconstruction whose relative profile error exceeds this is warned about.
PHEMA_WARN = 0.1


def warn_phema(net, what: str) -> None:
    """Log a warning when ``net`` is a post-hoc EMA reconstruction with a large profile error."""
    err = (getattr(net, "checkpoint_info", {}) or {}).get("phema_error")
    if err is not None and err > PHEMA_WARN:
        log.warning(
            "warning: the post-hoc EMA of %s has profile error %.2g (> %g): the snapshots cannot reproduce that "
            "sigma_rel / step well; pick a sigma_rel between the run's EMA profiles or a step with snapshots around it",
            what,
            err,
            PHEMA_WARN,
        )


def network_info(net) -> dict:
    """What a result records about a loaded network: class, step, post-hoc EMA and recipe."""
    info = getattr(net, "checkpoint_info", {}) or {}
    meta = info.get("meta") or {}
    out = {
        "model": (info.get("model") or {}).get("name"),
        "step": info.get("step"),
        "sigma_rel": info.get("sigma_rel"),
        "recipe": meta.get("recipe") if isinstance(meta, dict) else None,
    }
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
        for r in range(R):  # block (branch, seed // C), row seed % C
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


def default_ems(model: str | Path, sigma_rel: float | None = None, step: int | None = None) -> Path:
    """Where ``guidelab ems MODEL`` writes DPM-Solver-v3's statistics by default, and where a ``dpm_solver_v3``
    job looks: ``MODEL.ems.safetensors`` next to a checkpoint (``m.safetensors`` -> ``m.ems.safetensors``); in
    a training run folder ``RUN/ems-<step>-<sigma_rel>.safetensors``, named by the post-hoc EMA it is of
    (``sigma_rel`` default SampleConfig's, ``step`` default the last snapshot: as :func:`load_network`)."""
    model = Path(model)
    if not model.is_dir():
        stem = model.name[: -len(".safetensors")] if model.name.endswith(".safetensors") else model.name
        return model.with_name(f"{stem}.ems.safetensors")
    sigma_rel = SampleConfig.sigma_rel if sigma_rel is None else float(sigma_rel)
    if step is None:
        steps = [s for _, s, _ in snapshots(model)]
        check(bool(steps), f"no EMA snapshots (ema-<step>-<sigma_rel>.safetensors) in {model}")
        step = max(steps)
    return model / f"ems-{step:07d}-{sigma_rel!r}.safetensors"  # repr: the exact sigma_rel, no rounding


def ems_file(cfg: SampleConfig, sampler: str | None = None) -> Path | None:
    """The statistics file a ``dpm_solver_v3`` job reads (None for other samplers and for ``ems=degenerate``):
    ``sampler_options["ems"]`` when given, else :func:`default_ems` of the model (a run folder: of the job's
    ``sigma_rel`` and ``step``). A missing file or an exact world without ``ems=`` is one error line naming
    the ``guidelab ems`` command to run (a run folder: also the EMA choices it has statistics for)."""
    if (sampler or cfg.sampler) != "dpm_solver_v3":
        return None
    given = cfg.sampler_options.get("ems")
    if given == "degenerate":
        return None
    if given is not None:
        check(isinstance(given, str), f"--sampler-option ems= takes a file path or 'degenerate', got {given!r}")
        path = Path(given)
        check(
            path.is_file(),
            f"--sampler-option ems={given}: no such statistics file; write it with `guidelab ems {cfg.model or 'MODEL'} "
            f"--out {given}` (or give ems=degenerate: DPM-Solver++ multistep)",
        )
        return path
    model = cfg.model
    if model is None:
        raise GuidelabError("dpm_solver_v3 on an exact world needs statistics: give --sampler-option ems=PATH or ems=degenerate")
    path = default_ems(model, cfg.sigma_rel, cfg.step)
    if Path(model).is_dir():
        have = sorted(p.name for p in Path(model).glob("ems-*.safetensors"))
        step = int(path.name.split("-")[1])
        check(
            path.is_file(),
            f"dpm_solver_v3 needs the statistics of {model}'s post-hoc EMA at sigma_rel {cfg.sigma_rel:g}, step {step} "
            f"({path.name}; the folder has {', '.join(have) or 'none'}): compute them with "
            f"`guidelab ems {model} --sigma-rel {cfg.sigma_rel!r} --step {step}` "
            "(or give --sampler-option ems=PATH, or ems=degenerate: DPM-Solver++ multistep)",
        )
        return path
    check(
        path.is_file(),
        f"dpm_solver_v3 needs the model's statistics {path}: compute them with `guidelab ems {cfg.model}` "
        "(or give --sampler-option ems=PATH, or ems=degenerate: DPM-Solver++ multistep)",
    )
    return path


#: The schedule options of a job (CLI flag, SampleConfig field); a distilled student's own grid replaces them.
SCHEDULE_FLAGS = (("--steps", "steps"), ("--sigma-min", "sigma_min"), ("--sigma-max", "sigma_max"), ("--rho", "rho"))


def distilled_meta(net) -> dict:
    """A distilled student's ``meta.distilled`` ({} for other networks): :func:`guidelab.training.student.distilled_info`
    (a progressive student carries its sigma grid and sampler)."""
    return distilled_info(net) or {}


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
            guide = toy.tree("AB", dtype=dtype) if cfg.guider != "none" else None  # the unconditional world
        else:
            self.net = load_network(cfg.model, cfg.sigma_rel, cfg.step, device).to(dtype)
            warn_phema(self.net, f"--model {cfg.model}")
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
                warn_phema(guide, f"--guide {cfg.guide}")
        if cfg.label is not None:
            check(
                self.num_classes > 0 or cfg.guider == "classifier",
                f"{cfg.model or cfg.world} is unconditional: it takes no --label",
            )
            n_cls = self.num_classes or getattr(guide, "num_classes", 0)
            check(
                cfg.label == "balanced" or cfg.label < n_cls,
                f"--label {cfg.label} out of range: the model has {n_cls} classes (0 .. {n_cls - 1}, or balanced)",
            )
        chunk = cfg.chunk if cfg.world is None else 0  # the exact world uses no GEMM
        self.main = Counted(self.net, self.counts, "model", chunk)
        self.guide = (
            None if guide is None else Counted(guide, self.counts, "classifier" if cfg.guider == "classifier" else "guide", chunk)
        )
        self.sampler = cfg.sampler or (distilled_meta(self.net).get("sampler") or "euler" if grid is not None else "heun")
        check_sampler_options(self.sampler, cfg.sampler_options)
        self.sampler_options = dict(cfg.sampler_options)
        if self.sampler == "dpm_solver_v3":  # its statistics, loaded once (a missing file: one error line)
            path = ems_file(cfg, self.sampler)
            self.sampler_options["ems"] = samplers.EMS.load(path) if path is not None else samplers.EMS.degenerate()
        if grid is not None:  # a distilled student samples on its own grid: schedule options would be ignored
            default = {f.name: f.default for f in fields(cfg)}
            given = [
                flag
                for flag, key in SCHEDULE_FLAGS
                if getattr(cfg, key) != default[key] and not (key == "steps" and cfg.steps == len(grid) - 1)
            ]
            check(
                not given,
                f"{cfg.model} is a distilled student: it samples on its own {len(grid) - 1}-step grid, so "
                f"{', '.join(given)} does not apply; drop it",
            )
            self.sigmas = torch.tensor(grid, dtype=dtype, device=device)
            self.schedule = f"checkpoint grid ({len(grid) - 1} steps)"
        else:
            sigma_max = cfg.sigma_max if cfg.sigma_max is not None else (80.0 if self.image else 5.0)
            self.sigmas = schedules.karras(cfg.steps, cfg.sigma_min, sigma_max, cfg.rho, dtype=dtype, device=device)
            self.schedule = f"karras({cfg.steps}, {cfg.sigma_min:g}, {sigma_max:g}, rho={cfg.rho:g})"
        self.denoiser([0])  # build once: a bad guider fails before sampling

    def _classifier(self):
        from ...models.digits import DigitsClassifier
        from ..digits_cache import digits_classifier

        cfg = self.cfg
        if cfg.guide is None:
            check(self.shape == (1, 8, 8), "classifier guidance without --guide uses the digits classifier: needs a 1x8x8 model")
            return digits_classifier(noise_aware=True).to(self.device, self.dtype)
        clf = load_network(cfg.guide, device=self.device)
        check(
            "Classifier" in type(clf).__name__,
            f"{cfg.guide} is a {type(clf).__name__}, not a classifier; classifier "
            "guidance needs a noise-aware classifier (guidelab classifier --noise-aware)",
        )
        check(
            getattr(clf, "noise_aware", False) or not isinstance(clf, DigitsClassifier),
            f"{cfg.guide} is a clean classifier; classifier guidance needs a noise-aware one (guidelab classifier --noise-aware)",
        )
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
        cfg, clf = self.cfg, self.cfg.guider == "classifier"
        ctx = registry.Context(
            self.main,
            cfg.weight(),
            guide=None if clf else self.guide,
            classifier=self.guide if clf else None,
            seeds=[int(s) for s in seeds],
            options=cfg.guider_options,
            interval=cfg.interval,
            unconditional=cfg.unconditional,
            sampler=self.sampler,
            what=cfg.model or f"the exact world {cfg.world}",
        )
        return registry.build(cfg.guider, ctx)

    def reset(self) -> None:
        for k in self.counts:
            self.counts[k] = 0

    def probe(self) -> None:
        """Sample seed 0 on a 2-step grid (sigma_max, sigma_min, 0) and check the result is finite and shaped
        ``shape``: a wrong guide, a broken checkpoint or NaN weights fail here, before a job writes anything."""
        try:
            x = self.generate([0], sigmas=self.sigmas[[0, -2, -1]])
        except (RuntimeError, IndexError, TypeError) as e:  # shape / dtype mismatch between networks
            raise GuidelabError(f"the guided denoiser fails on one sample: {str(e).splitlines()[0]}") from None
        finally:
            self.reset()
        check(x.shape == (1, *self.shape), f"the guided denoiser returns shape {list(x.shape[1:])}, expected {list(self.shape)}")
        allowed = samplers.base.nonfinite_allowed()  # --allow-nonfinite
        check(
            allowed or bool(np.isfinite(x).all()),
            f"{self.cfg.model or self.cfg.world} with guider {self.cfg.guider} gives "
            "NaN or inf on a 2-step test sample (non-finite weights, or sigma_max too large?)",
        )

    @torch.no_grad()
    def generate(self, seeds, sigmas: torch.Tensor | None = None, callback=None) -> np.ndarray:
        """Samples [len(seeds), *shape] (raw, not clipped): x_T = sigma_max * N(0, I) and the sampler's noise
        from per-seed generators, so row i depends only on ``seeds[i]``. ``sigmas``: another grid (default the job's);
        ``callback``: the sampler's per-step callback (progress)."""
        seeds = [int(s) for s in seeds]
        sigmas = self.sigmas if sigmas is None else sigmas
        noise = SampleNoise(seeds, device=self.device)
        x = noise.randn(self.shape, self.dtype) * sigmas[0]
        cond = {}
        labels = self.labels(seeds)
        if labels is not None and (not self.cfg.unconditional or self.cfg.guider == "classifier"):
            cond[getattr(getattr(self.net, "condition", None), "key", "label")] = labels.to(self.device)  # EDM2: class_labels
        kw = {"noise": noise} if samplers.info(self.sampler).stochastic else {}
        nets = [n for n in (self.main, self.guide) if n is not None]
        for n in nets:
            n.seeds = seeds
        try:
            if callback is not None:
                kw["callback"] = callback
            out = samplers.get(self.sampler)(self.denoiser(seeds), x, sigmas, cond=cond or None, **kw, **self.sampler_options)
        finally:
            for n in nets:
                n.seeds = None
        return out.cpu().numpy()

    def describe(self) -> dict:
        """Sampler, grid, guider and networks, for results files."""
        cfg = self.cfg
        d = {
            "sampler": self.sampler,
            "schedule": self.schedule,
            "steps": len(self.sigmas) - 1,
            "guider": cfg.guider,
            "w": cfg.w,
            "weight": cfg.weight_text(),
            "interval": list(cfg.interval) if cfg.interval else None,
            "label": cfg.label,
            "unconditional": cfg.unconditional,
            "guider_options": cfg.guider_options,
            "nfe_per_call": registry.get(cfg.guider).nfe,
            "world": cfg.world,
        }
        if cfg.model is not None:
            d["model"] = {"path": str(cfg.model), **network_info(self.net)}
        if self.guide is not None and cfg.world is None:
            d["guide"] = {
                "path": str(cfg.guide) if cfg.guide else "packaged noise-aware digits classifier (guidelab/assets)",
                **network_info(self.guide.net),
            }
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
