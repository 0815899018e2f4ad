"""FLUX.1 in guidelab: packed latents, the position ids, its distilled guidance input, and its time grid.

* Latents are *packed* as diffusers' ``FluxPipeline`` makes them: [B, C, h, w] -> 2x2 patches ->
  [B, (h / 2)(w / 2), 4 C]; the sampler works on the packed tensor (EDM space is shape-agnostic), the VAE gets
  it unpacked (:func:`unpack`).
* The image / text position ids ([seq, 3], the same for every row) are bound into the velocity call
  (:func:`velocity_call`), so they never enter the batched conditioning.
* ``guidance`` [B]: the guidance-distilled model's embedded guidance scale (diffusers' ``guidance_scale``); it is
  conditioning like the prompt, not a guider: ``guider="none"`` with ``guidance=3.5`` is diffusers' default
  call, ``guider="cfg"`` with a negative prompt is diffusers' ``true_cfg_scale = w``.
* The grid (``schedule="pipeline"``): ``sigmas = linspace(1, 1 / n, n)`` (none with ``use_flow_sigmas``) through
  the scheduler's dynamic shift at ``mu`` = :func:`~.flow.flux_mu` of the packed sequence length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import flow


def latent_size(pipe: Any, height: int, width: int) -> tuple[int, int]:
    """The unpacked latent (h, w) of an image size, as ``FluxPipeline.prepare_latents`` rounds it."""
    f = pipe.vae_scale_factor
    return 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))


def packed_shape(pipe: Any, height: int, width: int) -> list[int]:
    """[seq, 4 C] of one packed latent."""
    h, w = latent_size(pipe, height, width)
    return [(h // 2) * (w // 2), pipe.transformer.config.in_channels]


def unpack(latents: torch.Tensor, pipe: Any, height: int, width: int) -> torch.Tensor:
    """[B, seq, 4 C] -> [B, C, h, w] (diffusers' ``_unpack_latents``)."""
    return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)


def image_ids(pipe: Any, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    h, w = latent_size(pipe, height, width)
    return pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)


def velocity_call(model: torch.nn.Module, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``v(x_t, timestep, **cond)`` of a FluxTransformer2DModel with the position ids bound; ``timestep`` is
    ``t * 1000`` (the pipeline passes ``timestep / 1000``)."""

    def v(x_t: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        return model(hidden_states=x_t, timestep=timestep / 1000, img_ids=img_ids, txt_ids=txt_ids, **cond, return_dict=False)[0]

    return v


def pipeline_sigmas(scheduler_config: dict[str, Any], steps: int, seq_len: int) -> torch.Tensor:
    """EDM sigmas of ``FluxPipeline``'s grid for ``steps`` steps at packed sequence length ``seq_len``."""
    c = dict(scheduler_config)
    sig = None if c.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
    return flow.flow_sigmas(c, steps, mu=flow.flux_mu(seq_len, c), sigmas=sig)
