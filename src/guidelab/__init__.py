"""guidelab: guiding diffusion models.

The contract (see DEVELOPERS.md):
  * a denoiser is a function ``D(x, sigma, **cond) -> x0 estimate`` with ``sigma`` of shape [batch];
  * a guider builds a denoiser out of denoisers (``w = 1`` is no guidance);
  * a sampler is a plain function ``sampler(denoiser, x, sigmas, **options) -> x``;
  * schedules return sigmas that end in 0.
"""

from . import denoisers, guidance, metrics, models, rng, samplers, schedules, toy, training  # noqa: F401

__version__ = "0.1.0"
