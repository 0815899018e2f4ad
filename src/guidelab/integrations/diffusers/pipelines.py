"""Prompt in, image out: a local diffusers pipeline folder guided by any registry guider and sampled by any guidelab
sampler, with the pipeline's own ``encode_prompt`` and VAE.

    pipe = load_pipeline("path/to/sd", dtype=torch.float32, device="cpu")
    images = pipe.generate(["a red cube"], guider="cfg", w=7.5, steps=20, seeds=[0])   # [N, 3, H, W] in [0, 1]

Supported: :data:`PIPELINES`. The denoiser: :class:`~.adapter.DiffusersDenoiser` (VP UNets) or
:class:`~.flow.FlowDenoiser` (SD3); the schedule ``"pipeline"`` is the folder's scheduler grid
(:mod:`.scheduler`). The negative prompt (default "") is the reference branch of cfg and its relatives.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ...errors import GuidelabError, check
from ...guidance import registry
from ...guidance.protocols import Condition
from ...rng import SampleNoise
from . import flow, scheduler
from .adapter import DiffusersDenoiser, make_sigmas

#: Pipeline class -> its denoiser's folder.
PIPELINES = {"StableDiffusionPipeline": "unet", "StableDiffusion3Pipeline": "transformer"}
#: Guiders whose reference branch is the negative / empty prompt (the registry's ``null_label`` need).
REFERENCE = tuple(registry.names(needs={"null_label"}))
#: Components each pipeline needs (a missing one is an error naming folder and component).
COMPONENTS = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusion3Pipeline": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
}


def load_pipeline(folder, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Pipeline:
    """A :class:`Pipeline` from a local folder (``model_index.json``; ``local_files_only=True``) or a ready
    ``DiffusionPipeline``; an unsupported class or a missing component is one clear error."""
    import diffusers

    if isinstance(folder, (str, os.PathLike)):
        path = Path(folder)
        index = path / "model_index.json"
        check(index.exists(), f"{path} has no model_index.json (expected a local diffusers pipeline folder)")
        import json

        spec = json.loads(index.read_text())
        name = spec.get("_class_name")
        check(name in PIPELINES, f"{path}: pipeline class {name!r} is not supported; allowed: {', '.join(PIPELINES)}")
        for comp in COMPONENTS[name]:
            check((path / comp).is_dir(), f"{path}: component {comp!r} is missing (no {comp}/ folder); nothing is downloaded")
        try:
            absent = {k: None for k, v in spec.items() if isinstance(v, list) and v[0] is None}  # saved as None
            pipe = getattr(diffusers, name).from_pretrained(path, local_files_only=True, torch_dtype=dtype, **absent)
        except (OSError, ValueError) as e:
            raise GuidelabError(f"{path}: cannot load {name}: {str(e).splitlines()[0]}") from None
    else:
        pipe = folder
        name = type(pipe).__name__
        check(name in PIPELINES, f"pipeline class {name!r} is not supported; allowed: {', '.join(PIPELINES)}")
    return Pipeline(pipe.to(device=device, dtype=dtype), dtype=dtype, device=device)


class Pipeline:
    """A diffusers pipeline guidelab samples (see the module docstring)."""

    def __init__(self, pipe, *, dtype: torch.dtype, device):
        self.pipe, self.dtype, self.device = pipe, dtype, torch.device(device)
        self.kind = type(pipe).__name__
        self.flow = self.kind == "StableDiffusion3Pipeline"
        self.net = getattr(pipe, PIPELINES[self.kind])
        self.config = dict(pipe.scheduler.config)

    # -- conditioning -------------------------------------------------------------------------
    def encode(self, prompts: list[str], negative: str):
        """``(cond [N], null)`` of the prompts and the negative prompt, by the pipeline's ``encode_prompt``."""
        p = self.pipe
        with torch.no_grad():
            if self.flow:
                emb, neg, pooled, neg_pooled = p.encode_prompt(
                    prompts,
                    prompts,
                    prompts,
                    device=self.device,
                    do_classifier_free_guidance=True,
                    negative_prompt=[negative] * len(prompts),
                )
                return (
                    {"encoder_hidden_states": emb, "pooled_projections": pooled},
                    {"encoder_hidden_states": neg[:1], "pooled_projections": neg_pooled[:1]},
                )
            emb, neg = p.encode_prompt(prompts, self.device, 1, True, negative_prompt=[negative] * len(prompts))
            return {"encoder_hidden_states": emb}, {"encoder_hidden_states": neg[:1]}

    def denoiser(self, null: dict):
        """The pipeline's network as an EDM denoiser whose null condition is ``null`` (the negative prompt)."""
        if not self.flow:
            return DiffusersDenoiser(self.net, self.config, null_text=null["encoder_hidden_states"])
        over = {k: (lambda old, v=v: v.to(old).expand(old.shape[0], *v.shape[1:])) for k, v in null.items()}
        return flow.FlowDenoiser(
            flow.velocity_call(self.net),
            num_train_timesteps=self.config.get("num_train_timesteps", 1000),
            dtype=self.dtype,
            condition=Condition("encoder_hidden_states", over),
            model=self.net,
        )

    def latent_shape(self) -> list[int]:
        c = self.net.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return [c.in_channels, size, size]

    def sigmas(self, den, steps: int, schedule: str) -> torch.Tensor:
        if schedule == "pipeline":
            return scheduler.pipeline_sigmas(self.config if self.flow else den, steps).double()
        check(not self.flow, f"flow pipelines take schedule 'pipeline' (the scheduler's shifted grid), not {schedule!r}")
        return make_sigmas(den, steps, schedule).double()

    # -- sampling -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str],
        negative_prompt: str | None = None,
        guider: str = "cfg",
        w: float = 7.5,
        sampler: str | None = None,
        steps: int = 20,
        schedule: str = "pipeline",
        seeds: Sequence[int] = (0,),
        latents: torch.Tensor | None = None,
        out=None,
        progress: bool = False,
        guide: str | os.PathLike | Pipeline | None = None,
        interval: tuple[float, float] | None = None,
        **options,
    ) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1], decoded by the pipeline's VAE. ``sampler``: default the one equal to the
        folder's scheduler; ``latents``: the unit-Gaussian start a diffusers pipeline takes (else from ``seeds``,
        sample i from seed i); ``options``: the guider's keywords; ``out``: also write PNGs + a grid; ``guide``:
        autoguidance's weaker pipeline (a folder or a Pipeline of the same class with the same text encoders and VAE);
        ``interval = (lo, hi)``: guide only for lo < sigma <= hi (EDM sigma; flow: t / (1 - t))."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [int(s) for s in seeds]
        N = len(seeds) if latents is None else latents.shape[0]
        check(latents is None or len(seeds) in (1, N), f"seeds: give one per latent ({N}), got {len(seeds)}")
        check(len(prompts) in (1, N), f"give one prompt or one per seed ({N}), got {len(prompts)} prompts")
        check(
            negative_prompt is None or guider in REFERENCE,
            f"negative_prompt is the reference branch of {', '.join(REFERENCE)}; guider {guider!r} has none",
        )
        prompts = prompts * N if len(prompts) == 1 else prompts
        sampler = sampler or scheduler.default_sampler(self.config)
        cond, null = self.encode(prompts, negative_prompt or "")
        den = self.denoiser(null)
        sig = self.sigmas(den, steps, schedule)
        seeds = seeds * N if len(seeds) == 1 and N > 1 else seeds
        noise = SampleNoise(seeds, device=self.device)
        L = noise.randn(self.latent_shape(), dtype=torch.float64) if latents is None else latents
        state = flow.STATE_DTYPE if self.flow else (torch.float32 if self.dtype != torch.float64 else torch.float64)
        x = scheduler.start(self.config, sig, L.to(self.device, state))
        check(guide is None or guider == "autoguidance", f"guide= is autoguidance's second pipeline, not {guider!r}'s")
        guide_den = self.guide(guide).denoiser(null) if guide is not None else None
        ctx = registry.Context(
            den,
            w=w,
            guide=guide_den,
            seeds=seeds,
            interval=interval,
            options=registry.parse_options(guider, options),
            sampler=sampler,
            what=f"this {self.kind}",
        )
        guided = registry.build(guider, ctx)
        final = 0.0 if self.flow else scheduler.final_sigma(den)
        if not self.flow:
            guided = scheduler.x0_wrapper(guided, den)
        with torch.no_grad():
            x = scheduler.sample(sampler, guided, x, sig.to(state), final=final, cond=cond, noise=noise, progress=progress)
            images = self.decode(x, final)
        if out is not None:
            save_images(out, images, seeds)
        return images

    def guide(self, other: str | os.PathLike | Pipeline) -> Pipeline:
        """autoguidance's guide: same pipeline class, text encoders and VAE (weights equal), else one clear error."""
        g = other if isinstance(other, Pipeline) else load_pipeline(other, dtype=self.dtype, device=self.device)
        check(g.kind == self.kind, f"the guide is a {g.kind}, the main pipeline a {self.kind}: they must match")
        shared = [c for c in COMPONENTS[self.kind] if c.startswith("text_encoder") or c == "vae"]
        for comp in shared:
            a, b = getattr(self.pipe, comp).state_dict(), getattr(g.pipe, comp).state_dict()
            same = a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k].to(a[k])) for k in a)
            check(
                same,
                f"the guide's {comp} differs from the main pipeline's: autoguidance needs the same text "
                "encoders and VAE (only the denoiser may differ)",
            )
        check(dict(g.pipe.scheduler.config) == self.config, "the guide's scheduler config differs from the main one's")
        return g

    def decode(self, x: torch.Tensor, final: float) -> torch.Tensor:
        """The VAE's image of EDM-space latents at sigma ``final`` (as the pipeline: unscale, shift, decode, [0, 1])."""
        vae = self.pipe.vae
        z = x / (1 + final**2) ** 0.5
        z = z / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        image = vae.decode(z.to(self.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()


def save_images(out, images: torch.Tensor, seeds: Sequence[int]) -> None:
    """``out/<seed>.png`` and ``out/grid.png``, each written atomically."""
    from ..._io import to_uint8, write_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arr = (images.clamp(0, 1) * 2 - 1).cpu().numpy()
    ims = to_uint8(arr)
    for s, im in zip(seeds, ims, strict=True):
        write_png(out / f"{int(s):06d}.png", im)
    write_png(out / "grid.png", _grid(ims))


def _grid(ims):
    import numpy as np

    n = len(ims)
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    h, w_, c = ims[0].shape if ims[0].ndim == 3 else (*ims[0].shape, 1)
    g = (
        np.zeros((rows * h, cols * w_, c), dtype=ims[0].dtype).squeeze(-1)
        if c == 1
        else np.zeros((rows * h, cols * w_, c), dtype=ims[0].dtype)
    )
    for k, im in enumerate(ims):
        r, q = divmod(k, cols)
        g[r * h : (r + 1) * h, q * w_ : (q + 1) * w_] = im
    return g
