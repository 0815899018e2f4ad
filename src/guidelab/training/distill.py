"""Guidance distillation, stage 1 (Meng et al. 2023, arXiv 2210.03142; methods.md §9), for ANY guider.

A student ``D_s(x; sigma, c, w)`` with the guidance weight as an extra scalar input regresses the guided
teacher over a range of weights::

    L = lambda(sigma) * mean || D_s(x; sigma, c, w) - sg[D_teacher^w(x; sigma, c)] ||^2,
    w ~ U[w_min, w_max] per sample,  x = x0 + sigma n,  ln(sigma) ~ N(P_mean, P_std^2)

with EDM's ``lambda(sigma) = 1 / c_out^2`` (the same data, noise and weighting as diffusion training).
The teacher is ``guider(w)``, any function from a [batch] weight tensor to a denoiser, e.g.
``lambda w: guidance.cfg(net, w)`` or ``lambda w: guidance.autoguidance(main, guide, w)`` (distilled
autoguidance). Sampling the student costs ONE network evaluation per step (:func:`distilled_denoiser`).

Convention: guidelab's ``w`` (``w = 1``: no guidance, ``D = D_ref + w (D - D_ref)``) is Meng's
``w_Meng + 1`` (Meng: ``x^w = (1 + w) x_c - w x_u``); Meng's pixel range ``w_Meng in [0, 4]`` is
``w in [1, 5]`` here. The student sees guidelab's ``w``.

Stage 2 (progressive step halving, Salimans & Ho 2022) is not implemented.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..denoisers import edm_loss
from ..errors import check
from .loop import LoopConfig, train

#: ``guider(w) -> denoiser``, ``w`` a [batch] tensor (or a number).
Guider = Callable[[Any], Callable[..., torch.Tensor]]
#: ``data(batch, generator) -> x0`` or ``(x0, cond)``: clean data and its conditioning (e.g. ``{"label": y}``).
Data = Callable[[int, torch.Generator], Any]


@dataclass(frozen=True)
class DistillConfig:
    """The distillation loss settings (the optimisation settings are a :class:`LoopConfig`)."""

    w_min: float = 1.0
    w_max: float = 5.0                 # Meng's pixel range w_Meng in [0, 4]
    P_mean: float = -1.2               # ln(sigma) ~ N(P_mean, P_std^2), EDM's defaults
    P_std: float = 1.2
    key: str = "w"                     # the student's extra scalar keyword

    def __post_init__(self):
        check(self.w_min <= self.w_max, f"need w_min <= w_max, got [{self.w_min}, {self.w_max}]")
        check(self.P_std > 0, f"P_std must be > 0, got {self.P_std!r}")
        check(isinstance(self.key, str) and self.key.isidentifier(), f"key must be a keyword name, got {self.key!r}")


def _split(out) -> tuple[torch.Tensor, dict]:
    if isinstance(out, torch.Tensor):
        return out, {}
    x0, cond = out
    return x0, dict(cond or {})


def distill_loss(guider: Guider, data: Data, cfg: DistillConfig = DistillConfig()):
    """The stage-1 loss ``loss_fn(student, batch, generator) -> [batch]`` (all randomness from the generator).

    The student must have a ``precond`` (:class:`guidelab.denoisers.EDMPrecond`) for ``lambda(sigma)``.
    """
    def loss_fn(student, batch: int, gen: torch.Generator) -> torch.Tensor:
        x0, cond = _split(data(batch, gen))
        dev = x0.device
        sigma = (torch.randn(batch, generator=gen, device=dev) * cfg.P_std + cfg.P_mean).exp().to(x0.dtype)
        x = x0 + sigma.reshape((-1,) + (1,) * (x0.ndim - 1)) * torch.randn(x0.shape, generator=gen, device=dev, dtype=x0.dtype)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(batch, generator=gen, device=dev, dtype=x0.dtype)
        with torch.no_grad():                                    # sg[.]: the teacher is a fixed target
            target = guider(w)(x, sigma, **cond)
        return edm_loss(student, x, sigma, target.to(x0.dtype), student.precond, **cond, **{cfg.key: w})
    return loss_fn


def distill_student(run_dir: str | Path, model_config: dict, guider: Guider, data: Data,
                    cfg: DistillConfig = DistillConfig(), loop: LoopConfig = LoopConfig(), *,
                    teacher: str = "", progress: bool = True, checkpoint_every: int = 256,
                    device: str = "cpu", threads: int | None = None) -> Path:
    """Distil ``guider`` into a fresh ``model_config`` network; return the final EMA snapshot's path.

    Resumable and reused like any :func:`guidelab.training.train` run. ``model_config`` must name a
    network with ``extra_scalar=cfg.key`` (e.g. ToyMLP / PixelMLP). The guider and data are code, not
    config: ``teacher`` (a free-form description, e.g. checkpoint paths and the guider's name) is stored
    in the run's metadata so a folder is not silently reused for another teacher.
    """
    check(model_config.get("extra_scalar") == cfg.key,
          f"the student needs extra_scalar={cfg.key!r} in its model config, got {model_config.get('extra_scalar')!r}")
    meta = {"recipe": "distill", **asdict(cfg), "teacher": teacher}
    return train(run_dir, model_config, distill_loss(guider, data, cfg), loop, meta=meta,
                 checkpoint_every=checkpoint_every, progress=progress, desc="distill", device=device, threads=threads)


def distilled_denoiser(student, w, *, key: str = "w") -> Callable[..., torch.Tensor]:
    """The student at guidance weight ``w`` (a number or a [batch] tensor) as a plain denoiser.

    ``D(x, sigma, **cond) = student(x, sigma, **cond, w=w)``: one network evaluation per call, so a
    sampler pays one evaluation per step instead of the teacher's two.
    """
    def D(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        wt = torch.as_tensor(w, dtype=x.dtype, device=x.device)
        return student(x, sigma, **cond, **{key: wt.expand(x.shape[0]) if wt.ndim == 0 else wt})
    return D
