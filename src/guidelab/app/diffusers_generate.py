"""Sampling runs of a local diffusers model (``guidelab diffusers``): any guidelab sampler and any guider of the
registry, per-sample seeds, PNGs and ``samples.npz`` written atomically.

    x0 = generate("my-dit", DiffusersConfig(guider="pag", w=2.0, seeds=range(8), label=3), out="runs/pag")
    x0 = generate("my-dit", guider="pag", w=2.0, seeds=range(8), label=3)      # the same, fields as keywords
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import samplers
from .._io import atomic_write, png_name, to_uint8, write_png
from ..errors import GuidelabError, check
from ..guidance import registry
from ..integrations.diffusers import (
    MASK,
    SLG_WINDOW,
    DiffusersDenoiser,
    Perturbation,
    load,
    make_sigmas,
    scheduler,
    step_window,
)
from ..rng import SampleNoise

#: Guiders whose options include ``layers`` and ``cfg_weight`` (the attention hooks; nag takes ``layers`` only).
ATTENTION = ("pag", "seg", "slg", "sag")
#: The network's fixed block of rows (``DiffusersConfig.block``), as ``guidelab sample``'s ``app.jobs.Counted``.
BLOCK = 64


@dataclass
class DiffusersConfig:
    """What to sample (:func:`generate`); names as in ``guidelab sample`` (:class:`~guidelab.app.jobs.SampleConfig`).

    ``guider``: a name of :mod:`guidelab.guidance.registry` at weight ``w`` (1: no guidance) with its keywords
    ``guider_options`` (``{k: v}`` or ``["k=v", ...]``); ``guide``: autoguidance's second model folder.
    ``layers`` (pag, seg, slg: the attention layers, default diffusers' recommended ones; tsg: the time embedders)
    and ``cfg_weight`` (pag, seg, slg: CFG as well, in the same call) may also be given as guider options.
    ``interval = (lo, hi)``: guide only for lo < sigma <= hi; slg defaults to diffusers' step window
    (:data:`~guidelab.integrations.diffusers.SLG_WINDOW`; ``(0, inf)``: every step).
    Conditioning: ``label`` (one class id or one per seed) and ``null_label`` (the null class cfg uses; DiT: its
    own), or ``prompt_embeds`` [1 or N, L, dim] with ``prompt_mask`` [1 or N, L] and the null / negative prompt
    ``null_text`` [1, L, dim] with ``null_mask`` [1, L]; ``resolution``: the pixel size micro-conditioned PixArt
    models are told (default 8 x sample_size, PixArt's VAE factor). Schedule: ``schedule`` (karras between the
    model's sigma ends, diffusers' spacing names, or "pipeline": the folder's scheduler grid, start scaling,
    x0 clipping / thresholding and final step as its pipeline makes them) of ``steps``; ``timesteps``: sigma -> t
    ("interpolate", "nearest"). ``sampler_options``: the sampler's keywords. ``dtype``: the network's (half
    precision: a float32 sampler). ``progress``: one bar over the samples (advanced per sampler step).
    ``allow_pickle``: load pickled ``.bin`` weights (they can run code; default: safetensors only).

    Batch invariance (``block`` > 0, default :data:`BLOCK`): samples are drawn in fixed blocks of ``block`` seeds,
    ``[k block, (k + 1) block)``, the sample of seed s in row ``s % block`` of its block; seeds of a block that were
    not asked for fill the other rows (sampled, then dropped). Every network call then has the same rows in the
    same places whatever ``batch`` or the other seeds are, so a sample (``samples.npz``) is bit-identical at any
    batch size; the cost is whole blocks (a single seed samples ``block`` rows). ``block = 0``: batches of
    ``batch`` seeds (the last bits may then depend on the batch).
    """

    guider: str = "none"
    w: float = 1.0
    guide: str | os.PathLike | None = None
    sampler: str = "euler"
    steps: int = 32
    schedule: str = "karras"
    timesteps: str = "interpolate"
    seeds: Sequence[int] = (0,)
    batch: int = 16
    block: int = BLOCK
    label: int | Sequence[int] | None = None
    null_label: int | None = None
    prompt_embeds: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    null_text: torch.Tensor | None = None
    null_mask: torch.Tensor | None = None
    layers: Sequence[str] | None = None
    cfg_weight: float | None = None
    interval: tuple[float, float] | None = None
    guider_options: Mapping[str, Any] | Sequence[str] = field(default_factory=dict)
    sampler_options: Mapping[str, Any] = field(default_factory=dict)
    resolution: int | None = None
    dtype: str | torch.dtype = "float32"
    device: str | torch.device = "cpu"
    progress: bool = False
    allow_pickle: bool = False


def make_guider(
    den: DiffusersDenoiser,
    guider: str,
    w,
    *,
    guide: DiffusersDenoiser | None = None,
    seeds=None,
    options: Mapping[str, Any] | Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    cfg_weight: float | None = None,
    interval=None,
    sampler: str | None = None,
):
    """The registry's guider ``guider`` on ``den`` (``registry.build``: options parsed and checked, needs checked,
    ``interval`` applied); ``layers`` / ``cfg_weight`` join the options of pag, seg, slg, sag (``layers`` also of
    nag; of tsg it picks the time embedders); ``seeds``: the batch's per-sample seeds (icg, tsg)."""
    options = registry.parse_options(guider, options)
    check(
        layers is None or guider in (*ATTENTION, "nag", "tsg"),
        f"layers is for pag, seg, slg or tsg (and sag, nag), not {guider!r}",
    )
    check(
        cfg_weight is None or guider in (*ATTENTION, "nag"),
        f"cfg_weight combines CFG with pag, seg or slg (and sag, nag); for {guider!r} use guider='cfg' or leave it unset",
    )
    for key, value in (("layers", layers), ("cfg_weight", cfg_weight)):
        if value is not None and guider in (*ATTENTION, "nag"):
            check(key not in options, f"{key} is given twice (as {key}= and as a guider option)")
            options[key] = registry.parse_options(guider, {key: list(value) if key == "layers" else value})[key]
    check(
        not (guider == "icg" and "num_classes" in options and den.cond_key == "encoder_hidden_states"),
        "num_classes is for class-conditional models; text models get a Gaussian embedding",
    )
    if guider == "tsg" and layers is not None:
        den = den.with_perturbation(Perturbation("tsg", layers))
    if guider == "autoguidance" and guide is not None:
        check(
            guide.grid.shape == den.grid.shape and torch.allclose(guide.grid, den.grid),
            "the guide model's noise schedule differs from the main model's",
        )
    ctx = registry.Context(
        den,
        w=w,
        guide=guide,
        seeds=seeds,
        options=options,
        interval=interval,
        sampler=sampler,
        what=f"this {type(den.model).__name__}",
    )
    return registry.build(guider, ctx)


def save_outputs(out: str | os.PathLike, x: torch.Tensor, seeds: Sequence[int], **extra) -> Path:
    """``out/samples.npz`` (x, seeds, extra arrays) and, for 1- or 3-channel samples, ``out/<seed:06d>.png``
    (values in [-1, 1] mapped to 0..255); every file written atomically (temp file + os.replace)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arr = x.detach().float().cpu().numpy()
    if arr.shape[1] in (1, 3):
        for s, im in zip(seeds, to_uint8(arr), strict=True):
            write_png(out / png_name(s), im)
    path = out / "samples.npz"
    atomic_write(
        path,
        lambda f: np.savez(
            f, x=arr, seeds=np.asarray(list(seeds), dtype=np.int64), **{k: np.asarray(v) for k, v in extra.items()}
        ),
    )
    return path


def _config(config: DiffusersConfig | None, fields: dict) -> DiffusersConfig:
    names = [f.name for f in dataclasses.fields(DiffusersConfig)]
    bad = sorted(set(fields) - set(names))
    check(not bad, f"generate takes no {', '.join(bad)}; allowed: {', '.join(names)}")
    return dataclasses.replace(config or DiffusersConfig(), **fields)


def _conditioning(cfg: DiffusersConfig, den: DiffusersDenoiser, N: int, size: int) -> dict[str, torch.Tensor]:
    """The conditioning of all N samples: labels, prompt embeddings and masks, PixArt micro-conditions."""
    out: dict[str, torch.Tensor] = {}
    if cfg.label is not None:
        labels = torch.as_tensor(cfg.label, dtype=torch.long).reshape(-1)
        check(labels.numel() in (1, N), f"label: give one class or one per seed ({N}), got {labels.numel()}")
        out["class_labels"] = labels.expand(N).to(cfg.device)
    emb, mask = cfg.prompt_embeds, cfg.prompt_mask
    if emb is not None:
        check(
            emb.ndim == 3 and emb.shape[0] in (1, N), f"prompt_embeds must have shape [1 or {N}, L, dim], got {list(emb.shape)}"
        )
        out["encoder_hidden_states"] = emb.to(device=cfg.device, dtype=_dtype(cfg.dtype)).expand(N, -1, -1)
    if mask is None and emb is not None and cfg.null_mask is not None:  # both CFG branches carry a mask: one call
        mask = torch.ones(1, emb.shape[1], dtype=cfg.null_mask.dtype)
    if mask is not None:
        check(
            emb is not None and tuple(mask.shape) in ((1, emb.shape[1]), (N, emb.shape[1])),
            f"prompt_mask must have shape [1 or {N}, L] next to prompt_embeds, got {list(mask.shape)}",
        )
        out[MASK] = mask.to(cfg.device).expand(N, -1)
    if den.micro:  # PixArt micro-conditions, as its pipeline
        px = 8 * size if cfg.resolution is None else int(cfg.resolution)
        out["resolution"] = torch.tensor([[px, px]], dtype=torch.float64, device=cfg.device).expand(N, -1)
        out["aspect_ratio"] = torch.ones(N, 1, dtype=torch.float64, device=cfg.device)
    return out


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = ("float32", "float64", "float16", "bfloat16")
    check(dtype in allowed, f"dtype must be one of {', '.join(allowed)}, got {dtype!r}")
    return getattr(torch, dtype)


def generate(
    model_dir: str | os.PathLike, config: DiffusersConfig | None = None, *, out: str | os.PathLike | None = None, **fields
) -> torch.Tensor:
    """Sample a local diffusers model as ``config`` says (fields may also be given as keywords); returns x0
    [N, C, H, W] in model space (latent models: latents, no VAE decoding); ``out``: also write the files
    (:func:`save_outputs`).

    Sample i starts from ``SampleNoise([seeds[i]])`` and draws its sampler noise from the same generator; with
    ``block`` (the default) the network sees fixed blocks of rows, so a sample is bit-identical at any ``batch``
    (:class:`DiffusersConfig`); the guider is built per block or batch (icg / tsg draw from each sample's seed,
    APG's momentum starts fresh).
    """
    cfg = _config(config, fields)
    seeds = [int(s) for s in cfg.seeds]
    check(len(seeds) >= 1, "need at least one seed")
    check(cfg.batch >= 1, f"batch must be >= 1, got {cfg.batch}")
    check(isinstance(cfg.block, int) and cfg.block >= 0, f"block must be an integer >= 0 (0: off), got {cfg.block!r}")
    check(
        not cfg.block or len(set(seeds)) == len(seeds),
        "seeds must be distinct (each seed has its own row of its block)",
    )
    check(
        not cfg.block or max(seeds) // cfg.block * cfg.block + cfg.block <= 2**63,
        f"block {cfg.block}: the block of seed {max(seeds)} reaches past 2^63 - 1; use a power-of-two block",
    )

    dtype = _dtype(cfg.dtype)
    kw = {
        "dtype": dtype,
        "device": cfg.device,
        "timesteps": cfg.timesteps,
        "null_label": cfg.null_label,
        "null_text": cfg.null_text,
        "null_mask": cfg.null_mask,
        "allow_pickle": cfg.allow_pickle,
    }
    den = load(model_dir, **kw)
    guide = load(cfg.guide, **kw) if cfg.guide is not None else None
    pipeline = cfg.schedule == "pipeline"
    sigmas = scheduler.pipeline_sigmas(den, cfg.steps) if pipeline else make_sigmas(den, cfg.steps, cfg.schedule)
    final = scheduler.final_sigma(den) if pipeline else 0.0
    interval = cfg.interval
    if interval is None and cfg.guider == "slg":
        interval = step_window(sigmas, *SLG_WINDOW)

    def guided(batch_seeds):
        g = make_guider(
            den,
            cfg.guider,
            cfg.w,
            guide=guide,
            seeds=batch_seeds,
            options=cfg.guider_options,
            layers=cfg.layers,
            cfg_weight=cfg.cfg_weight,
            interval=interval,
            sampler=cfg.sampler,
        )
        return scheduler.x0_wrapper(g, den) if pipeline else g

    guided(seeds[: cfg.batch])  # bad combinations fail before any sampling
    run = samplers.get(cfg.sampler)
    mc = den.model.config
    size = mc.sample_size if isinstance(mc.sample_size, int) else mc.sample_size[0]
    N = len(seeds)
    cond_all = _conditioning(cfg, den, N, size)
    needs = registry.get(cfg.guider).needs
    key = None if den.condition is None else den.condition.key
    check(
        key is None or key in cond_all or (not needs & {"null_label", "condition"} and cfg.cfg_weight is None),
        f"{cfg.guider} on this model needs {key} (label= / --label, or prompt embeddings)",
    )
    check(
        key != "encoder_hidden_states" or key in cond_all, "a text-conditioned model needs prompt_embeds (encoder_hidden_states)"
    )
    xdtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32  # half models: float32 sampler
    shape: list[int] = [int(mc.in_channels), int(size), int(size)]

    bar = None
    if cfg.progress:  # one bar over the samples asked for, advanced per sampler step (as guidelab sample's)
        from tqdm.auto import tqdm

        from ..log import release
        from .jobs.shards import BAR

        release()  # held phase lines first, then the bar
        bar = tqdm(total=N, desc="sampling", unit="sample", bar_format=BAR)

    def sample(batch_seeds: list[int], cond: dict, asked: int) -> torch.Tensor:
        """The samples of ``batch_seeds`` (``asked`` of them count on the bar)."""
        noise = SampleNoise(batch_seeds, device=cfg.device)
        if pipeline:  # the pipeline's unit-Gaussian latents, scaled as its scheduler does
            x = scheduler.start(den, sigmas.double(), noise.randn(shape, dtype=torch.float64)).to(xdtype)
        else:
            x = noise.randn(shape, dtype=xdtype) * sigmas[0].to(xdtype)
        kw = dict(cond=cond, noise=noise, **dict(cfg.sampler_options))
        done, steps = [0], len(sigmas) - 1
        if bar is not None:

            def step(info):
                target = asked * min(int(info.get("i", 0)) + 1, steps) // steps  # whole samples: totals add up
                if target > done[0]:
                    bar.update(target - done[0])
                    done[0] = target

            kw["callback"] = step
        if pipeline:
            y = scheduler.sample(cfg.sampler, guided(batch_seeds), x, sigmas.to(xdtype), final=final, **kw)
        else:
            y = run(guided(batch_seeds), x, sigmas.to(xdtype), **kw)
        if bar is not None and asked > done[0]:
            bar.update(asked - done[0])  # samplers that skip a callback
        return y

    x = torch.empty(N, *shape, dtype=xdtype, device=cfg.device)
    try:
        _fill(x, seeds, cond_all, cfg, sample)
    finally:
        if bar is not None:
            bar.close()
    if out is not None:
        extra = {"class_labels": cond_all["class_labels"].cpu()} if "class_labels" in cond_all else {}
        save_outputs(out, x, seeds, **extra)
    return x


def _fill(x: torch.Tensor, seeds: list[int], cond_all: dict, cfg: DiffusersConfig, sample) -> None:
    """``x[i]`` = the sample of ``seeds[i]``: in fixed blocks of ``cfg.block`` seeds, or batches of ``cfg.batch``."""
    N = len(seeds)
    if cfg.block:
        C = cfg.block
        blocks: dict[int, list[int]] = {}
        for pos, s in enumerate(seeds):  # block k holds seeds [k C, (k + 1) C), seed s in row s % C
            blocks.setdefault(s // C, []).append(pos)
        for k, positions in blocks.items():
            rows = torch.tensor([seeds[p] % C for p in positions], device=cfg.device)
            where = torch.tensor(positions, device=cfg.device)
            fill = torch.full((C,), positions[0], dtype=torch.long, device=cfg.device).index_put((rows,), where)
            cond = {key: v[fill] for key, v in cond_all.items()}  # rows not asked for: the first asked-for condition
            x[where] = sample(list(range(k * C, (k + 1) * C)), cond, len(positions))[rows]
    else:
        for i in range(0, N, cfg.batch):
            part = seeds[i : i + cfg.batch]
            x[i : i + cfg.batch] = sample(part, {k: v[i : i + cfg.batch] for k, v in cond_all.items()}, len(part))


def parse_seeds(text: str) -> list[int]:
    """``0-7`` (a range, inclusive) or ``1,2,5``."""
    try:
        if "-" in text:
            first, last = (int(v) for v in text.split("-"))
            return list(range(first, last + 1))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GuidelabError(f"--seeds must look like 0-7 or 1,2,5, got {text!r}") from None


def generate_images(
    folder: str | os.PathLike,
    prompts: Sequence[str],
    *,
    out: str | os.PathLike,
    seeds: Sequence[int],
    dtype: str = "fp32",
    device: str = "cpu",
    progress: bool = True,
    allow_pickle: bool = False,
    **kw,
) -> torch.Tensor:
    """``guidelab generate``: prompt(s) -> ``out/<seed>.png`` + ``out/grid.png`` through
    :func:`guidelab.integrations.diffusers.load_pipeline` (``kw``: :meth:`Pipeline.generate`'s keywords;
    ``allow_pickle``: pickled ``.bin`` components too, with a logged warning)."""
    from ..integrations.diffusers import load_pipeline

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    check(dtype in dtypes, f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    extra = {"allow_pickle": True} if allow_pickle else {}
    pipe = load_pipeline(folder, dtype=dtypes[dtype], device=device, **extra)
    return pipe.generate(list(prompts), seeds=list(seeds), out=out, progress=progress, **kw)
