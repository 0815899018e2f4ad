"""Prompt in, image out: a local diffusers pipeline folder guided by any registry guider and sampled by any guidelab
sampler, with the pipeline's own ``encode_prompt`` and VAE.

    pipe = load_pipeline("path/to/sd", dtype=torch.float32, device="cpu")
    images = pipe.generate(["a red cube"], guider="cfg", w=7.5, steps=20, seeds=[0])   # [N, 3, H, W] in [0, 1]

Supported: :data:`PIPELINES`. The denoiser: :class:`~.adapter.DiffusersDenoiser` (VP UNets, PixArt),
:class:`~.sdxl.SDXLDenoiser` (SDXL) or :class:`~.flow.FlowDenoiser` (SD3, FLUX: :mod:`.flux`); the schedule
``"pipeline"`` is the folder's scheduler grid (:mod:`.scheduler`, FLUX / SD3 dynamic shift included). The negative
prompt (default: "", SDXL's zeros) is the reference branch of cfg and its relatives.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...errors import GuidelabError, check
from ...guidance import registry
from ...guidance.protocols import Condition
from ...rng import SampleNoise
from . import flow, flux, scheduler
from .adapter import DiffusersDenoiser, make_sigmas
from .guiders import SLG_WINDOW, step_window
from .sdxl import SDXLDenoiser

#: Pipeline class -> its denoiser's folder.
PIPELINES = {
    "StableDiffusionPipeline": "unet",
    "StableDiffusionXLPipeline": "unet",
    "PixArtAlphaPipeline": "transformer",
    "PixArtSigmaPipeline": "transformer",
    "StableDiffusion3Pipeline": "transformer",
    "FluxPipeline": "transformer",
}
#: Flow-matching pipelines (:mod:`.flow`); the others are VP (:class:`~.adapter.DiffusersDenoiser`).
FLOW = ("StableDiffusion3Pipeline", "FluxPipeline")
#: Guiders whose reference branch is the negative / empty prompt (the registry's ``null_label`` need).
REFERENCE = tuple(n for n in registry.names() if "null_label" in registry.get(n).needs)
_CLIP = ("text_encoder", "tokenizer")
#: Components each pipeline needs (a missing one is an error naming folder and component).
COMPONENTS = {
    "StableDiffusionPipeline": ("unet", "vae", *_CLIP, "scheduler"),
    "StableDiffusionXLPipeline": ("unet", "vae", *_CLIP, "text_encoder_2", "tokenizer_2", "scheduler"),
    "PixArtAlphaPipeline": ("transformer", "vae", *_CLIP, "scheduler"),
    "PixArtSigmaPipeline": ("transformer", "vae", *_CLIP, "scheduler"),
    "StableDiffusion3Pipeline": ("transformer", "vae", *_CLIP, "text_encoder_2", "tokenizer_2", "scheduler"),
    "FluxPipeline": ("transformer", "vae", *_CLIP, "text_encoder_2", "tokenizer_2", "scheduler"),
}
#: Weight files that unpickle (refused unless ``allow_pickle=True``).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: PixArt's resolution bins by transformer sample_size (diffusers' ``use_resolution_binning``).
_BINS = {
    "PixArtAlphaPipeline": {128: "ASPECT_RATIO_1024_BIN", 64: "ASPECT_RATIO_512_BIN", 32: "ASPECT_RATIO_256_BIN"},
    "PixArtSigmaPipeline": {
        256: "ASPECT_RATIO_2048_BIN",
        128: "ASPECT_RATIO_1024_BIN",
        64: "ASPECT_RATIO_512_BIN",
        32: "ASPECT_RATIO_256_BIN",
    },
}
#: A conditioning dict (network keyword -> tensor [N, ...]).
Cond = dict[str, Any]
log = logging.getLogger("guidelab.integrations.diffusers")


def _weights(folder: Path, spec: dict[str, Any], allow_pickle: bool) -> None:
    """Refuse (unless ``allow_pickle``) a component whose weights exist only as pickle files."""
    pickled = []
    for comp, v in spec.items():
        d = folder / comp
        if comp.startswith("_") or not (isinstance(v, list) and v[0] is not None) or not d.is_dir():
            continue
        names = [p.name for p in d.iterdir() if p.is_file()]
        if any(n.endswith(PICKLE_SUFFIXES) for n in names) and not any(n.endswith(".safetensors") for n in names):
            pickled.append(comp)
    if not pickled:
        return
    check(
        allow_pickle,
        f"{folder}: the weights of {', '.join(pickled)} are pickle files only (.bin / .pt); they are not loaded "
        "(unpickling can run code): convert them to safetensors, or pass allow_pickle=True (CLI --allow-bin)",
    )
    log.warning("%s: loading pickle weights of %s (allow_pickle=True): unpickling can run code", folder, ", ".join(pickled))


def load_pipeline(
    folder: str | os.PathLike[str] | Any,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> Pipeline:
    """A :class:`Pipeline` from a local folder (``model_index.json``; ``from_pretrained(..., local_files_only=True,
    use_safetensors=True)``) or a ready ``DiffusionPipeline``; an unsupported class, a missing component or
    pickle-only weights (unless ``allow_pickle=True``, which logs a warning) is one clear error."""
    import diffusers

    if isinstance(folder, (str, os.PathLike)):
        path = Path(folder)
        index = path / "model_index.json"
        check(index.exists(), f"{path} has no model_index.json (expected a local diffusers pipeline folder)")
        spec = json.loads(index.read_text())
        name = spec.get("_class_name")
        check(name in PIPELINES, f"{path}: pipeline class {name!r} is not supported; allowed: {', '.join(PIPELINES)}")
        for comp in COMPONENTS[name]:
            check((path / comp).is_dir(), f"{path}: component {comp!r} is missing (no {comp}/ folder); nothing is downloaded")
        _weights(path, spec, allow_pickle)
        try:
            absent = {k: None for k, v in spec.items() if isinstance(v, list) and v[0] is None}  # saved as None
            pipe = getattr(diffusers, name).from_pretrained(
                path,
                local_files_only=True,
                use_safetensors=None if allow_pickle else True,
                torch_dtype=dtype,
                **absent,
            )
        except (OSError, ValueError) as e:
            raise GuidelabError(f"{path}: cannot load {name}: {str(e).splitlines()[0]}") from None
    else:
        pipe = folder
        name = type(pipe).__name__
        check(name in PIPELINES, f"pipeline class {name!r} is not supported; allowed: {', '.join(PIPELINES)}")
    return Pipeline(pipe.to(device=device, dtype=dtype), dtype=dtype, device=device)


def _expand_to(v: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The null override of one key: ``v`` [1, ...] cast and expanded to the batch of the value it replaces."""
    return lambda old: v.to(old).expand(old.shape[0], *v.shape[1:])


class Pipeline:
    """A diffusers pipeline guidelab samples (see the module docstring)."""

    def __init__(self, pipe: Any, *, dtype: torch.dtype, device: str | torch.device) -> None:
        self.pipe, self.dtype, self.device = pipe, dtype, torch.device(device)
        self.kind = type(pipe).__name__
        self.flow = self.kind in FLOW
        self.net = getattr(pipe, PIPELINES[self.kind])
        self.config: dict[str, Any] = dict(pipe.scheduler.config)
        self._sig: dict[
            tuple[int, str, tuple[int, ...]], torch.Tensor
        ] = {}  # (steps, schedule, size) -> the run's sigmas (pure functions of the config)
        self._base: DiffusersDenoiser | None = None
        self._txt_ids: torch.Tensor | None = None  # FLUX's text position ids (set by encode)

    # -- sizes ----------------------------------------------------------------------------------
    def size(self, height: int | None, width: int | None, binning: bool = True) -> tuple[int, int, tuple[int, int] | None]:
        """``(height, width, orig)`` of the image the network samples: the pipeline's default size, PixArt's
        resolution bin (``orig``: the size it is resized back to, None without binning; ``binning=False``:
        diffusers' ``use_resolution_binning=False``, the size as given)."""
        p, c = self.pipe, self.net.config
        f = p.vae_scale_factor
        if self.kind == "FluxPipeline":
            return (height or p.default_sample_size * f), (width or p.default_sample_size * f), None
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        h, w = height or size * f, width or size * f
        bins = _BINS.get(self.kind, {})
        if c.sample_size not in bins or not binning:
            return h, w, None  # diffusers bins only these sizes (others: use_resolution_binning=False)
        from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha
        from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma

        table = getattr(sigma if hasattr(sigma, bins[c.sample_size]) else alpha, bins[c.sample_size])
        bh, bw = p.image_processor.classify_height_width_bin(h, w, ratios=table)
        return bh, bw, (h, w)

    def latent_shape(self, height: int, width: int) -> list[int]:
        if self.kind == "FluxPipeline":
            return flux.packed_shape(self.pipe, height, width)
        f = self.pipe.vae_scale_factor
        return [self.net.config.in_channels, int(height) // f, int(width) // f]

    # -- conditioning -------------------------------------------------------------------------
    def encode(
        self, prompts: list[str], negative: str | None, *, size: tuple[int, int], guidance: float | None, reference: bool
    ) -> tuple[Cond, Cond]:
        """``(cond [N], null)`` of the prompts and the negative prompt (None: the pipeline's own default, "" or
        SDXL's zeros), by the pipeline's ``encode_prompt``; ``reference``: the guider has a reference branch.

        One ``encode_prompt`` call per run: the batch ``prompts + [negative]`` with
        ``do_classifier_free_guidance=False`` (diffusers encodes the N negatives in a second call; every family pads
        both to the same fixed length, so the rows are the same embeddings), split into rows ``[:N]`` and ``[N]``."""
        with torch.no_grad():
            if self.kind == "FluxPipeline":
                return self._encode_flux(prompts, negative, guidance, reference)
            check(guidance is None, f"guidance= is FLUX's distilled guidance input; a {self.kind} has none")
            if self.kind == "StableDiffusionXLPipeline":
                return self._encode_sdxl(prompts, negative, size)
            if self.kind in _BINS:
                return self._encode_pixart(prompts, negative, size)
            return self._encode_sd(prompts, negative)

    def _encode_sd(self, prompts: list[str], negative: str | None) -> tuple[Cond, Cond]:
        """SD 1.x / 2.x and SD3 (CLIP pair; its absent T5 gives zeros)."""
        p, dev, N, batch = self.pipe, self.device, len(prompts), [*prompts, negative or ""]
        if self.kind == "StableDiffusion3Pipeline":
            emb, _, pooled, _ = p.encode_prompt(batch, batch, batch, device=dev, do_classifier_free_guidance=False)
            cond = {"encoder_hidden_states": emb[:N], "pooled_projections": pooled[:N]}
            return cond, {"encoder_hidden_states": emb[N:], "pooled_projections": pooled[N:]}
        emb, _ = p.encode_prompt(batch, dev, 1, False)
        return {"encoder_hidden_states": emb[:N]}, {"encoder_hidden_states": emb[N:]}

    def _encode_sdxl(self, prompts: list[str], negative: str | None, size: tuple[int, int]) -> tuple[Cond, Cond]:
        """SDXL: the second-to-last CLIP states of both encoders, the pooled embedding and the size / crop ids; no
        negative prompt with ``force_zeros_for_empty_prompt``: zeros on the reference branch (as diffusers)."""
        p, dev, N = self.pipe, self.device, len(prompts)
        zeros = negative is None and bool(p.config.get("force_zeros_for_empty_prompt", False))
        batch = prompts if zeros else [*prompts, negative or ""]
        emb, _, pooled, _ = p.encode_prompt(batch, None, dev, 1, False)
        neg, neg_pooled = (torch.zeros_like(emb[:1]), torch.zeros_like(pooled[:1])) if zeros else (emb[N:], pooled[N:])
        te2 = p.text_encoder_2
        proj = int(pooled.shape[-1]) if te2 is None else te2.config.projection_dim
        ids = p._get_add_time_ids(size, (0, 0), size, dtype=emb.dtype, text_encoder_projection_dim=proj)
        cond = {"encoder_hidden_states": emb[:N], "text_embeds": pooled[:N], "time_ids": ids.to(dev).repeat(N, 1)}
        return cond, {"encoder_hidden_states": neg, "text_embeds": neg_pooled}

    def _encode_pixart(self, prompts: list[str], negative: str | None, size: tuple[int, int]) -> tuple[Cond, Cond]:
        """PixArt: T5 states with their padding masks; alpha-1024 models (sample_size 128) also take diffusers'
        micro-conditions ``resolution`` [N, 2] (height, width) and ``aspect_ratio`` [N, 1] (height / width)."""
        p, dev, N = self.pipe, self.device, len(prompts)
        emb, mask, _, _ = p.encode_prompt(
            [*prompts, negative or ""],
            False,
            device=dev,
            clean_caption=True,
            max_sequence_length=120 if self.kind == "PixArtAlphaPipeline" else 300,
        )
        cond = {"encoder_hidden_states": emb[:N], "encoder_attention_mask": mask[:N]}
        if self.net.config.sample_size == 128:  # diffusers' micro-conditions (PixArt alpha 1024)
            h, w = size
            cond["resolution"] = torch.tensor([[h, w]] * N, dtype=emb.dtype, device=dev)
            cond["aspect_ratio"] = torch.tensor([[h / w]] * N, dtype=emb.dtype, device=dev)
        return cond, {"encoder_hidden_states": emb[N:], "encoder_attention_mask": mask[N:]}

    def _encode_flux(
        self, prompts: list[str], negative: str | None, guidance: float | None, reference: bool
    ) -> tuple[Cond, Cond]:
        """FLUX: T5 states + pooled CLIP; the negative (true CFG) only with a reference branch; the distilled
        ``guidance`` [N] for guidance-embedded models (required there, refused elsewhere)."""
        p, dev, N = self.pipe, self.device, len(prompts)
        if self.net.config.guidance_embeds:
            check(guidance is not None, "this FLUX model is guidance-distilled: pass guidance= (diffusers' 3.5)")
        else:
            check(guidance is None, "guidance= is the input of guidance-distilled FLUX models; this one has none")
        batch = [*prompts, negative or ""] if reference else prompts
        emb, pooled, txt_ids = p.encode_prompt(batch, batch, device=dev)
        cond: Cond = {"encoder_hidden_states": emb[:N], "pooled_projections": pooled[:N]}
        if guidance is not None:
            cond["guidance"] = torch.full((N,), guidance, device=dev, dtype=torch.float32)
        null = {"encoder_hidden_states": emb[N:], "pooled_projections": pooled[N:]} if reference else {}
        self._txt_ids = txt_ids
        return cond, null

    def denoiser(self, null: Cond, size: tuple[int, int] | None = None) -> DiffusersDenoiser | flow.FlowDenoiser:
        """The pipeline's network as an EDM denoiser whose null condition is ``null`` (the negative prompt)."""
        if not self.flow:
            if self._base is None:  # the schedule (alpha_bar from the scheduler config) is computed once
                self._base = (SDXLDenoiser if self.kind == "StableDiffusionXLPipeline" else DiffusersDenoiser)(
                    self.net, self.config
                )
            den = copy.copy(self._base)
            den.null_text, den.null_mask = null["encoder_hidden_states"], null.get("encoder_attention_mask")
            if isinstance(den, SDXLDenoiser):
                den.null_pooled = null["text_embeds"]
            return den
        over = {k: _expand_to(v) for k, v in null.items()}
        if self.kind == "FluxPipeline":
            assert size is not None and self._txt_ids is not None  # FLUX: ids of the image size, txt ids of encode
            ids = flux.image_ids(self.pipe, *size, self.device, self._txt_ids.dtype)
            velocity = flux.velocity_call(self.net, ids, self._txt_ids)
        else:
            velocity = flow.velocity_call(self.net)
        return flow.FlowDenoiser(
            velocity,
            num_train_timesteps=self.config.get("num_train_timesteps", 1000),
            dtype=self.dtype,
            condition=Condition("encoder_hidden_states", over),
            model=self.net,
        )

    def sigmas(self, den: Any, steps: int, schedule: str, latent: list[int]) -> torch.Tensor:
        key = (steps, schedule, tuple(latent))
        if key not in self._sig:
            self._sig[key] = self._sigmas(den, steps, schedule, latent)
        return self._sig[key]

    def _sigmas(self, den: Any, steps: int, schedule: str, latent: list[int]) -> torch.Tensor:
        if schedule != "pipeline":
            check(not self.flow, f"flow pipelines take schedule 'pipeline' (the scheduler's shifted grid), not {schedule!r}")
            return make_sigmas(den, steps, schedule).double()
        if self.kind == "FluxPipeline":
            return flux.pipeline_sigmas(self.config, steps, latent[0])
        if self.kind == "StableDiffusion3Pipeline":
            mu = None
            if self.config.get("use_dynamic_shifting"):
                ps = self.net.config.patch_size
                mu = flow.flux_mu((latent[1] // ps) * (latent[2] // ps), self.config, max_shift=1.16)
            return scheduler.pipeline_sigmas(self.config, steps, mu=mu).double()
        return scheduler.pipeline_sigmas(den, steps).double()

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
        out: str | os.PathLike[str] | None = None,
        progress: bool = False,
        guide: str | os.PathLike[str] | Pipeline | None = None,
        interval: tuple[float, float] | None = None,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        resolution_binning: bool = True,
        **options: Any,
    ) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1], decoded by the pipeline's VAE. ``sampler``: default the one equal to the
        folder's scheduler; ``latents``: the unit-Gaussian start a diffusers pipeline takes (its ``prepare_latents``
        shape, FLUX packed; else from ``seeds``, sample i from seed i); ``options``: the guider's keywords; ``out``:
        also write PNGs + a grid; ``guide``: autoguidance's weaker pipeline (a folder or a Pipeline of the same class
        with the same text encoders and VAE); ``interval = (lo, hi)``: guide only for lo < sigma <= hi (EDM sigma;
        flow: t / (1 - t)); ``guider="slg"`` defaults to diffusers' SLG step window (:data:`~.guiders.SLG_WINDOW`:
        the steps i of n with 0.01 n < i < 0.2 n, so at least 6 steps; ``(0, inf)``: every step); ``guidance``:
        guidance-distilled FLUX's embedded guidance scale (diffusers' ``guidance_scale``; its default 3.5 when
        None), with ``guider="cfg"`` and a negative prompt on top diffusers' ``true_cfg_scale = w``; ``height`` /
        ``width``: the image size (default the pipeline's); ``resolution_binning``: PixArt's snap to its trained
        aspect-ratio bins and resize back (diffusers' ``use_resolution_binning``, default on)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [int(s) for s in seeds]
        height, width = (None if v is None else int(v) for v in (height, width))  # the CLI's --option gives text
        guidance = None if guidance is None else float(guidance)
        if isinstance(resolution_binning, str):  # the CLI's --option resolution_binning=false
            check(
                resolution_binning.lower() in ("true", "false"),
                f"resolution_binning is true or false, got {resolution_binning!r}",
            )
            resolution_binning = resolution_binning.lower() == "true"
        N = len(seeds) if latents is None else latents.shape[0]
        check(latents is None or len(seeds) in (1, N), f"seeds: give one per latent ({N}), got {len(seeds)}")
        check(len(prompts) in (1, N), f"give one prompt or one per seed ({N}), got {len(prompts)} prompts")
        check(
            negative_prompt is None or guider in REFERENCE,
            f"negative_prompt is the reference branch of {', '.join(REFERENCE)}; guider {guider!r} has none",
        )
        check(guide is None or guider == "autoguidance", f"guide= is autoguidance's second pipeline, not {guider!r}'s")
        if guidance is None and self.kind == "FluxPipeline" and self.net.config.guidance_embeds:
            guidance = 3.5
        prompts = prompts * N if len(prompts) == 1 else prompts
        seeds = seeds * N if len(seeds) == 1 and N > 1 else seeds
        sampler = sampler or scheduler.default_sampler(self.config)
        if sampler == "plms":
            check(
                scheduler.class_name(self.config) == "PNDMScheduler" and self.config.get("skip_prk_steps", False),
                "sampler 'plms' is PNDMScheduler's with skip_prk_steps=True (the SD 1.x setting); its Runge-Kutta "
                "warm-up (skip_prk_steps=False) has no guidelab equal: set skip_prk_steps true in "
                "scheduler/scheduler_config.json, or use DDIMScheduler / EulerDiscreteScheduler",
            )
        h, w_img, orig = self.size(height, width, resolution_binning)
        parsed = registry.parse_options(guider, options)
        second = self.guide(guide) if guide is not None else None  # loaded outside inference mode (its weights)
        # inference_mode, not no_grad: no autograd bookkeeping on any op of the run (the gradient guiders open their
        # own autograd scope on clones); the images are cloned out of it so callers may edit them in place
        with torch.inference_mode():
            images = self._run(
                prompts,
                negative_prompt,
                guider,
                w,
                sampler,
                steps,
                schedule,
                seeds,
                latents,
                progress,
                second,
                interval,
                guidance,
                (h, w_img),
                orig,
                parsed,
            )
        images = images.clone()
        if out is not None:
            save_images(out, images, seeds)
        return images

    def _run(
        self,
        prompts: list[str],
        negative_prompt: str | None,
        guider: str,
        w: float,
        sampler: str,
        steps: int,
        schedule: str,
        seeds: list[int],
        latents: torch.Tensor | None,
        progress: bool,
        second: Pipeline | None,
        interval: tuple[float, float] | None,
        guidance: float | None,
        size: tuple[int, int],
        orig: tuple[int, int] | None,
        parsed: dict[str, Any],
    ) -> torch.Tensor:
        """:meth:`generate` after its checks: encode, start, sample, decode (images [N, 3, H, W] in [0, 1])."""
        reference = guider in REFERENCE or parsed.get("cfg_weight") is not None  # pag / seg / slg with CFG: the null
        cond, null = self.encode(prompts, negative_prompt, size=size, guidance=guidance, reference=reference)
        den = self.denoiser(null, size)
        shape = self.latent_shape(*size)
        check(
            latents is None or list(latents.shape[1:]) == shape,
            f"latents must be [N, {', '.join(map(str, shape))}] (as the pipeline's prepare_latents makes them), "
            f"got {list(latents.shape) if latents is not None else None}",
        )
        sig = self.sigmas(den, steps, schedule, shape)
        if interval is None and guider == "slg":  # diffusers' SLG step window (its SD3 pipeline's gate)
            interval = step_window(sig, *SLG_WINDOW)
        noise = SampleNoise(seeds, device=self.device)
        L = noise.randn(shape, dtype=torch.float64) if latents is None else latents
        state = flow.STATE_DTYPE if self.flow else (torch.float32 if self.dtype != torch.float64 else torch.float64)
        x = scheduler.start(self.config, sig, L.to(self.device, state))
        if second is not None and self.kind == "FluxPipeline":
            second._txt_ids = self._txt_ids  # the same text encoders: the same text position ids
        ctx = registry.Context(
            den,
            w=w,
            guide=None if second is None else second.denoiser(null, size),
            seeds=seeds,
            interval=interval,
            options=parsed,
            sampler=None if sampler == "plms" else sampler,  # plms: not a catalog sampler (it checks the guider)
            what=f"this {self.kind}",
        )
        guided = registry.build(guider, ctx)
        final = 0.0 if self.flow else scheduler.final_sigma(den)
        if not self.flow:
            guided = scheduler.x0_wrapper(guided, den)
        kw = {"prediction": den.prediction_type} if sampler == "plms" and isinstance(den, DiffusersDenoiser) else {}
        x = scheduler.sample(sampler, guided, x, sig.to(state), final=final, cond=cond, noise=noise, progress=progress, **kw)
        return self.decode(x, final, size, orig)

    def guide(self, other: str | os.PathLike[str] | Pipeline) -> Pipeline:
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

    def decode(self, x: torch.Tensor, final: float, size: tuple[int, int], orig: tuple[int, int] | None = None) -> torch.Tensor:
        """The VAE's image of EDM-space latents at sigma ``final`` (as the pipeline: unscale, unpack (FLUX),
        denormalise, decode, resize back from PixArt's bin, [0, 1])."""
        vae, c = self.pipe.vae, self.pipe.vae.config
        z = x / (1 + final**2) ** 0.5
        if self.kind == "FluxPipeline":
            z = flux.unpack(z, self.pipe, *size)
        mean, std = getattr(c, "latents_mean", None), getattr(c, "latents_std", None)
        if self.kind == "StableDiffusionXLPipeline" and mean is not None and std is not None:
            view = (1, len(mean), 1, 1)
            z = z * torch.tensor(std).view(view).to(z) / c.scaling_factor + torch.tensor(mean).view(view).to(z)
        else:
            z = z / c.scaling_factor + (getattr(c, "shift_factor", None) or 0.0)
        if self.kind == "StableDiffusionXLPipeline" and vae.dtype == torch.float16 and getattr(c, "force_upcast", False):
            vae.to(torch.float32)  # SDXL's VAE overflows in float16: decode in float32, as its pipeline does
            try:
                image = vae.decode(z.float(), return_dict=False)[0]
            finally:
                vae.to(torch.float16)
        else:
            image = vae.decode(z.to(self.dtype), return_dict=False)[0]
        if orig is not None:
            image = self.pipe.image_processor.resize_and_crop_tensor(image, orig[1], orig[0])
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()


def save_images(out: str | os.PathLike[str], images: torch.Tensor, seeds: Sequence[int]) -> None:
    """``out/<seed>.png`` and ``out/grid.png``, each written atomically."""
    from ..._io import png_name, to_uint8, write_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arr = (images.clamp(0, 1) * 2 - 1).cpu().numpy()
    ims = to_uint8(arr)
    for s, im in zip(seeds, ims, strict=True):
        write_png(out / png_name(s), im)
    write_png(out / "grid.png", _grid(ims))


def _grid(ims: Any) -> Any:
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
