"""Sampling jobs (``guidelab sample``, ``sweep``, ``evaluate``): what to sample (:mod:`.config`), the
networks and guider assembled once (:mod:`.assembly`), samples written in resumable shards over
``torchrun`` ranks (:mod:`.shards`).

What is sampled: the exact 2-D world, a toy checkpoint (shape ``[dim]``) or any guidelab image denoiser
(shape ``[C, H, W]`` from its config), a ``.safetensors`` checkpoint or a training run folder (its
post-hoc EMA, :func:`guidelab.training.phema.reconstruct`). Every guider name is an entry of the guider
registry (:mod:`guidelab.guidance.registry`); ``interval`` wraps any of them.
"""

from .assembly import Counted, Sampling, build, build_balanced, distilled_meta, network_info
from .config import GUIDERS, WORLD_GUIDERS, SampleConfig
from .shards import load_samples, load_shards, png_name, png_path, sample, shard_name

__all__ = [
    "SampleConfig",
    "GUIDERS",
    "WORLD_GUIDERS",
    "Counted",
    "Sampling",
    "build",
    "build_balanced",
    "distilled_meta",
    "network_info",
    "sample",
    "load_shards",
    "load_samples",
    "png_name",
    "png_path",
    "shard_name",
]
