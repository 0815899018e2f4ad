"""Denoisers: ``D(x, sigma, **cond) -> E[x0 | x]`` with ``sigma`` a per-sample tensor of shape [batch].

Notation (EDM, Karras et al. 2022): ``x = x0 + sigma * n``. The other parameterisations convert as

* score  ``s = (D - x) / sigma**2``              -> ``D = x + sigma**2 * s``
* eps    ``eps = (x - D) / sigma``                -> ``D = x - sigma * eps``
* v      (VP, ``z = x / sqrt(1 + sigma**2)``)     -> ``D = x / (1 + sigma**2) - sigma / sqrt(1 + sigma**2) * v``

The adapters below wrap a model of one parameterisation into a denoiser; ``to_*`` go the other way.
``Condition`` (what a conditional denoiser declares) and ``Guider`` (a denoiser built out of denoisers)
are the declared interfaces guiders and samplers read (also exported as ``guidance.Condition`` / ``Guider``).
``EDMPrecond`` holds the EDM preconditioning (Table 1 of EDM) used by network forward *and* the loss.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch

from .errors import check


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class Condition:
    """The conditioning a denoiser takes: ``D(x, sigma, **{key: value})``.

    ``null``: the overrides that make the unconditional (reference) branch, e.g. ``{"label": 10}``;
    ``num_classes``: the number of class labels (ICG draws uniform labels), None for a continuous embedding.
    """

    key: str
    null: Mapping[str, Any] = field(default_factory=dict)
    num_classes: int | None = None


class Guider(abc.ABC):
    """A denoiser built out of denoisers (``w = 1``: no guidance).

    ``name``: for messages and reprs; ``requires``: sampler features it needs (``{"renoise"}`` for CFG++).
    ``unguided`` is the main branch alone (1 NFE; guidance intervals use it). ``start(run)`` returns the
    guider bound to one sampling run (a :class:`guidelab.samplers.run.Run`; samplers call it once per run;
    default: the guider itself).
    ``pair`` is ``(D_data, D_renoise)`` for samplers with the renoise step; ``(D, D)`` unless a guider
    requires ``"renoise"``.
    """

    name: str = "guider"
    requires: frozenset[str] = frozenset()

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor: ...

    @abc.abstractmethod
    def unguided(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor: ...

    def start(self, run: Any) -> "Guider":
        return self

    def pair(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        D = self(x, sigma, **cond)
        return D, D


def bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a [batch] tensor so it broadcasts against ``x`` ([batch, 1, 1, ...])."""
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


# ---------------------------------------------------------------------------------------------
# Adapters: model of another parameterisation -> denoiser.


def from_score(score_fn: Callable[..., torch.Tensor]) -> Denoiser:
    """``score_fn(x, sigma, **cond) = grad log p(x; sigma)``  ->  ``D = x + sigma^2 s``."""

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return x + bcast(sigma, x) ** 2 * score_fn(x, sigma, **cond)

    return denoiser


def from_eps(eps_fn: Callable[..., torch.Tensor], *, vp_input: bool = False) -> Denoiser:
    """``eps_fn`` predicts the noise ``n``  ->  ``D = x - sigma eps``.

    With ``vp_input=True`` the model is fed ``x / sqrt(1 + sigma^2)`` (a VP/DDPM model's input).
    """

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        s = bcast(sigma, x)
        x_in = x / (1 + s**2).sqrt() if vp_input else x
        return x - s * eps_fn(x_in, sigma, **cond)

    return denoiser


def from_v(v_fn: Callable[..., torch.Tensor], *, sigma_data: float = 1.0) -> Denoiser:
    """v-prediction (Salimans & Ho 2022) -> denoiser; the model sees ``c_in x``.

    ``D = c_skip x + c_out v`` with the EDM v-scalings ``c_skip = sd^2/(s^2+sd^2)``,
    ``c_out = -s sd / sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)`` (``sd = 1`` is the VP case).
    """

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        s = bcast(sigma, x)
        r = (s**2 + sigma_data**2).sqrt()
        return sigma_data**2 / r**2 * x - s * sigma_data / r * v_fn(x / r, sigma, **cond)

    return denoiser


def to_score(D: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (D - x) / bcast(sigma, x) ** 2


def to_eps(D: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (x - D) / bcast(sigma, x)


def to_v(D: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, *, sigma_data: float = 1.0) -> torch.Tensor:
    s = bcast(sigma, x)
    r = (s**2 + sigma_data**2).sqrt()
    return (sigma_data**2 / r**2 * x - D) * r / (s * sigma_data)


# ---------------------------------------------------------------------------------------------
# EDM preconditioning.


@dataclass(frozen=True)
class EDMPrecond:
    """EDM preconditioning (Karras et al. 2022, Table 1); one object for forward and loss.

    ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` and the loss weight ``lambda = 1 / c_out^2``
    makes the effective training target of ``F`` unit-variance at every sigma.
    """

    sigma_data: float = 0.5

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(c_skip, c_out, c_in, c_noise)`` for a [batch] sigma (each [batch])."""
        sd2 = self.sigma_data**2
        r2 = sigma**2 + sd2
        c_skip = sd2 / r2
        c_out = sigma * self.sigma_data / r2.sqrt()
        c_in = 1 / r2.sqrt()
        c_noise = sigma.clamp_min(1e-20).log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(self, F: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        """Apply a raw network ``F(x_in, c_noise, **cond)`` as a preconditioned denoiser."""
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        return bcast(c_skip, x) * x + bcast(c_out, x) * F(bcast(c_in, x) * x, c_noise, **cond)


def edm_loss(
    denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor, precond: EDMPrecond, **cond: Any
) -> torch.Tensor:
    """Per-sample EDM loss ``lambda(sigma) * mean ||D(x; sigma) - target||^2`` (EDM eq. 2 and 8).

    Denoising score matching: ``x = x0 + sigma n`` and ``target = x0``. Where the exact ``E[x0 | x]``
    is known (the exact worlds) use it as ``target``: exact-score matching, the same minimiser with
    far less variance (the autoguidance toy example trains this way).
    """
    check(x.shape == target.shape, f"x {list(x.shape)} and target {list(target.shape)} must have the same shape")
    check(sigma.shape == x.shape[:1], f"sigma must have shape [batch]=[{x.shape[0]}], got {list(sigma.shape)}")
    err = (denoiser(x, sigma, **cond) - target) ** 2
    return precond.loss_weight(sigma) * err.flatten(1).mean(1)
