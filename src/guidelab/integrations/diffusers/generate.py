"""``generate``: sample a local diffusers model with any sampler and guider, per-sample seeds, files written."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ... import samplers
from ..._io import atomic_write, to_uint8, write_png
from ...errors import check
from ...rng import SampleNoise
from .adapter import MASK, load, make_sigmas
from .guiders import make_guider


def save_outputs(out: str | os.PathLike, x: torch.Tensor, seeds: Sequence[int], **extra) -> Path:
    """``out/samples.npz`` (x, seeds, extra arrays) and, for 1- or 3-channel samples, ``out/<seed>.png``
    (values in [-1, 1] mapped to 0..255); every file written atomically (temp file + os.replace)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arr = x.detach().float().cpu().numpy()
    if arr.shape[1] in (1, 3):
        for s, im in zip(seeds, to_uint8(arr)):
            write_png(out / f"{int(s):06d}.png", im)
    path = out / "samples.npz"
    atomic_write(path, lambda f: np.savez(f, x=arr, seeds=np.asarray(list(seeds), dtype=np.int64),
                                           **{k: np.asarray(v) for k, v in extra.items()}))
    return path


def generate(model_dir: str | os.PathLike, *, guider: str = "none", w: float = 1.0, sampler: str = "euler",
             steps: int = 32, schedule: str = "karras", seeds: Iterable[int] = (0,), batch: int = 16,
             class_labels: int | Sequence[int] | None = None, prompt_embeds: torch.Tensor | None = None,
             prompt_mask: torch.Tensor | None = None, null_class: int | None = None,
             null_text: torch.Tensor | None = None, null_mask: torch.Tensor | None = None, guide_dir=None,
             layers: Sequence[str] | None = None, blur_sigma: float = math.inf, interval=None, cfg_weight=None,
             options: dict | None = None, resolution: int | None = None, timesteps: str = "interpolate", dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", out: str | os.PathLike | None = None, progress: bool = False,
             **sampler_kw) -> torch.Tensor:
    """Sample a local diffusers model with any guidelab sampler and guider; returns x0 [N, C, H, W] (model space).

    Sample i starts from ``SampleNoise([seeds[i]])`` and draws its sampler noise from the same generator, so
    it does not depend on ``batch``. ``class_labels``: one id or one per seed; ``prompt_embeds``: [1 or N, L, dim]
    with optionally ``prompt_mask`` [1 or N, L]; ``null_text`` / ``null_mask``: null or negative prompt for CFG;
    ``cfg_weight``: CFG together with pag/seg/slg; ``guide_dir``: second model for autoguidance; ``options``:
    guider keywords (:func:`make_guider`; the guider is built per batch, so icg / tsg draw from each sample's
    seed and APG's momentum starts fresh); ``resolution``:
    the pixel size micro-conditioned PixArt models are told (default 8 x sample_size, PixArt's VAE factor).
    Latent models return latents (no VAE decoding).
    """
    seeds = [int(s) for s in seeds]
    check(len(seeds) >= 1, "need at least one seed")
    check(batch >= 1, f"batch must be >= 1, got {batch}")
    kw = {"dtype": dtype, "device": device, "timesteps": timesteps, "null_class": null_class, "null_text": null_text,
          "null_mask": null_mask}
    den = load(model_dir, **kw)
    guide = load(guide_dir, **kw) if guide_dir is not None else None
    def guided(batch_seeds):
        return make_guider(den, guider, w, guide=guide, layers=layers, blur_sigma=blur_sigma, interval=interval,
                           cfg_weight=cfg_weight, seeds=batch_seeds, options=options)
    guided(seeds[:batch])                                            # bad combinations fail before any sampling
    run = samplers.get(sampler)
    sigmas = make_sigmas(den, steps, schedule)
    mc = den.model.config
    channels = mc.in_channels
    size = mc.sample_size if isinstance(mc.sample_size, int) else mc.sample_size[0]
    N = len(seeds)
    cond_all: dict[str, torch.Tensor] = {}
    if class_labels is not None:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        check(labels.numel() in (1, N), f"class_labels: give one label or one per seed ({N}), got {labels.numel()}")
        cond_all["class_labels"] = labels.expand(N).to(device)
    if prompt_embeds is not None:
        check(prompt_embeds.ndim == 3 and prompt_embeds.shape[0] in (1, N),
              f"prompt_embeds must have shape [1 or {N}, L, dim], got {list(prompt_embeds.shape)}")
        cond_all["encoder_hidden_states"] = prompt_embeds.to(device=device, dtype=dtype).expand(N, -1, -1)
    if prompt_mask is not None:
        check(prompt_embeds is not None and prompt_mask.shape in ((1, prompt_embeds.shape[1]), (N, prompt_embeds.shape[1])),
              f"prompt_mask must have shape [1 or {N}, L] next to prompt_embeds, got {list(prompt_mask.shape)}")
        cond_all[MASK] = prompt_mask.to(device).expand(N, -1)
    if den.micro:                                                    # PixArt micro-conditions, as its pipeline
        px = 8 * size if resolution is None else int(resolution)
        cond_all["resolution"] = torch.tensor([[px, px]], dtype=torch.float64, device=device).expand(N, -1)
        cond_all["aspect_ratio"] = torch.ones(N, 1, dtype=torch.float64, device=device)
    check(den.cfg_key in cond_all or (guider not in ("cfg", "apg", "icg") and cfg_weight is None),
          f"{guider} on this model needs {den.cfg_key} (--class-label / prompt embeddings)")
    check(not (den.cfg_key == "encoder_hidden_states" and "encoder_hidden_states" not in cond_all),
          "a text-conditioned model needs prompt_embeds (encoder_hidden_states)")
    xdtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32   # half models: float32 sampler
    xs = []
    for i in range(0, N, batch):
        noise = SampleNoise(seeds[i:i + batch], device=device)
        x = noise.randn([channels, size, size], dtype=xdtype) * sigmas[0].to(xdtype)
        cond = {k: v[i:i + batch] for k, v in cond_all.items()}
        xs.append(run(guided(seeds[i:i + batch]), x, sigmas.to(xdtype), cond=cond, noise=noise, progress=progress,
                      **sampler_kw))
    x = torch.cat(xs)
    if out is not None:
        extra = {"class_labels": cond_all["class_labels"].cpu()} if "class_labels" in cond_all else {}
        save_outputs(out, x, seeds, **extra)
    return x
