"""Flow matching (rectified flow: SD3, FLUX) as an EDM denoiser, and the flow scheduler's own time grid.

A flow model predicts the velocity ``v = eps - x0`` of ``x_t = (1 - t) x0 + t eps``, t in [0, 1]. Dividing by
``1 - t`` gives EDM's ``x = x0 + sigma eps`` with

* ``sigma = t / (1 - t)``, ``t = sigma / (1 + sigma)``, input scaling ``x_t = x / (1 + sigma) = (1 - t) x``;
* ``D(x, sigma) = x_t - t v(x_t, t)``.

EDM Euler in these variables is flow Euler: ``x' = x + (sigma' - sigma)(x - D) / sigma`` divided by
``1 + sigma'`` is ``x_t' = x_t + (t' - t) v`` (and both equal DDIM, whose step is the same first-order map).

t = 1 (pure noise, where diffusers' flow schedules start) is sigma = inf; it is represented by
:data:`SIGMA_T1` = 1e10 (t = 1 - 1e-10, which rounds to the same float32 timestep and input as t = 1). Sampling
from it needs a float64 state (:data:`STATE_DTYPE`): ``x = (1 + sigma) eps`` is then exact to ~1e-16 relative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ...denoisers import bcast
from ...errors import GuidelabError, check
from ...guidance.protocols import Condition
from ...guidance.tsg import KEY as OFFSET

if TYPE_CHECKING:
    import numpy as np

    from .hooks import Perturbation

#: Flow models guidelab knows; the velocity call of each is :func:`velocity_call`.
FLOW_MODELS = ("SD3Transformer2DModel", "FluxTransformer2DModel")
#: The EDM sigma that stands for t = 1.
SIGMA_T1 = 1e10
#: The sampler state dtype of flow runs (see the module docstring).
STATE_DTYPE = torch.float64
#: FlowMatchEulerDiscreteScheduler settings guidelab cannot honour (a sampler, not a grid, would change).
REFUSED = ("invert_sigmas", "stochastic_sampling")


def to_t(sigma: torch.Tensor) -> torch.Tensor:
    """Flow time ``t = sigma / (1 + sigma)`` of EDM sigmas (inf -> 1)."""
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def to_sigma(t: torch.Tensor) -> torch.Tensor:
    """EDM ``sigma = t / (1 - t)`` of flow times; t = 1 maps to :data:`SIGMA_T1`."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.where(t >= 1, torch.full_like(t, SIGMA_T1), t / (1 - t).clamp_min(1e-300))


def velocity_call(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``v(x_t, timestep, **cond)`` of a diffusers flow transformer; ``timestep`` is ``t * num_train_timesteps``
    (what the pipelines pass; FLUX's pipeline divides it by 1000 before the call, so it gets ``t``)."""
    name = type(model).__name__
    check(name in FLOW_MODELS, f"{name} is not a flow model guidelab knows; allowed: {', '.join(FLOW_MODELS)}")
    scale = 1e-3 if name == "FluxTransformer2DModel" else 1.0

    def v(x_t: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        return model(hidden_states=x_t, timestep=timestep * scale, **cond, return_dict=False)[0]

    return v


class FlowDenoiser:
    """A velocity model ``v(x_t, timestep, **cond)`` as ``D(x, sigma, **cond)`` in EDM space (module docstring).

    ``x``: [B, ...] EDM scale; ``sigma``: [B]; ``num_train_timesteps``: T of ``timestep = t T``; ``dtype``: what
    the network takes (x_t and floating conditioning are cast to it; D comes back in x's dtype). With ``model`` an
    SD3 / FLUX transformer it declares :attr:`noise_embed_dim` and takes TSG's ``noise_embed_offset`` [B, dim]
    (added to the output of ``time_text_embed.timestep_embedder``, before the pooled-text / guidance embeddings
    are added to it, on the rows where it is non-zero).
    """

    def __init__(
        self,
        velocity: Callable[..., torch.Tensor],
        *,
        num_train_timesteps: int = 1000,
        dtype: torch.dtype = torch.float32,
        condition: Condition | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.velocity, self.T, self.dtype = velocity, num_train_timesteps, dtype
        self.condition, self.model = condition, model
        self._embedders: Perturbation | None = (
            None  # hooks.Perturbation("tsg"), made on first use (flow does not import hooks eagerly)
        )

    def _tsg(self) -> Perturbation:
        from .hooks import Perturbation

        if self._embedders is None:
            self._embedders = Perturbation("tsg")
        return self._embedders

    @property
    def noise_embed_dim(self) -> int | None:
        """TSG: size of the time-embedding vector ``noise_embed_offset`` shifts (SD3 / FLUX: the output of
        ``time_text_embed.timestep_embedder``); None without a known flow ``model``."""
        if self.model is None or type(self.model).__name__ not in FLOW_MODELS:
            return None
        return self._tsg().embed_dim(self.model)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        offset = cond.pop(OFFSET, None)
        if offset is not None:
            dim = self.noise_embed_dim
            check(
                dim is not None and offset.ndim == 2 and tuple(offset.shape) == (x.shape[0], dim),
                f"{OFFSET} must be [batch, noise_embed_dim] = [{x.shape[0]}, {dim}] (an SD3 / FLUX FlowDenoiser "
                f"made with model=...), got {list(offset.shape)}",
            )
            rows = offset.ne(0).any(1)
            if bool(rows.any()):
                from .hooks import perturbed_attention

                assert self.model is not None  # noise_embed_dim is None without one
                with perturbed_attention(self.model, self._tsg(), rows, offset=offset.to(self.dtype)):
                    return self(x, sigma, **cond)
        cond = {
            k: (v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in cond.items()
            if v is not None
        }
        t = to_t(sigma.to(torch.float64))
        tb = bcast(t, x).to(x.dtype)
        x_t = x / (1 + bcast(sigma.to(x.dtype), x))  # = (1 - t) x
        v = self.velocity(x_t.to(self.dtype), (t * self.T).to(device=x.device, dtype=torch.float32), **cond)
        return x_t - tb * v.to(x.dtype)  # x0 = x_t - t v


def flow_scheduler(scheduler_config: dict[str, Any]) -> Any:
    """diffusers' FlowMatchEulerDiscreteScheduler from a folder's config; settings that change the sampler (not
    the grid) are refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    bad = [k for k in REFUSED if cfg.get(k)]
    check(
        not bad, f"scheduler setting {', '.join(bad)} is not supported (it changes the sampler, not the time grid); set it false"
    )
    try:
        return FlowMatchEulerDiscreteScheduler.from_config(cfg)
    except (NotImplementedError, ValueError) as e:
        raise GuidelabError(f"unsupported flow scheduler config: {e}") from None


def flow_sigmas(
    scheduler_config: dict[str, Any], steps: int, *, mu: float | None = None, sigmas: Sequence[float] | np.ndarray | None = None
) -> torch.Tensor:
    """EDM sigmas (float64, ending in 0) of the grid the flow scheduler makes for ``steps`` steps: shift, dynamic
    shifting (``mu``, FLUX: from the image size, see :func:`flux_mu`), shift_terminal, karras / exponential / beta
    sigmas all as the scheduler applies them; ``sigmas``: the unshifted flow times a pipeline passes (FLUX:
    ``linspace(1, 1 / n, n)``); t = 1 becomes :data:`SIGMA_T1`."""
    check(isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps!r}")
    sched = flow_scheduler(scheduler_config)
    check(
        not sched.config.use_dynamic_shifting or mu is not None,
        "this flow scheduler uses dynamic shifting: pass mu (the resolution-dependent shift, flux_mu(...))",
    )
    sched.set_timesteps(None if sigmas is not None else steps, sigmas=sigmas, mu=mu)
    t = sched.sigmas.double()
    sig = to_sigma(t)
    sig[-1] = 0.0
    return sig


def flux_mu(image_seq_len: int, scheduler_config: dict[str, Any], *, max_shift: float = 1.15) -> float:
    """FLUX's dynamic shift ``mu``: linear in the packed sequence length between (base_image_seq_len, base_shift)
    and (max_image_seq_len, max_shift), as diffusers' ``calculate_shift``; ``max_shift``: the default when the
    config has none (FluxPipeline 1.15, StableDiffusion3Pipeline 1.16)."""
    c = dict(scheduler_config)
    lo, hi = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    b, m = c.get("base_shift", 0.5), c.get("max_shift", max_shift)
    k = (m - b) / (hi - lo)
    return image_seq_len * k + (b - k * lo)
