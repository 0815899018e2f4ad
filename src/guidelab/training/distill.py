"""Guidance distillation (Meng et al. 2023, arXiv 2210.03142; methods.md §9), for ANY guider.

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

Stage 2 (:func:`progressive_loss`, :func:`progressive_round`): progressive distillation (Salimans &
Ho 2022) of the w-conditioned student: a new student, initialised from the teacher's weights, takes
ONE deterministic Euler (DDIM) step from sigma_i to sigma_{i+2} where the teacher takes two, keeping
w as an input; each round halves the step count. Deterministic sampler only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..denoisers import bcast, edm_loss
from ..errors import check
from ..models import registry
from . import checkpoint
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


# ----------------------------------------------------------------------------------------------
# Stage 2: progressive distillation (Salimans & Ho 2022), w kept as an input.

def euler_step(D: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One deterministic Euler / DDIM step of the PF-ODE, per-sample sigmas [batch] (as ``samplers.euler``):
    ``x + (sigma_next - sigma) (x - D) / sigma = D + (sigma_next / sigma) (x - D)``."""
    return torch.lerp(D, x, bcast(sigma_next / sigma, x))


def _check_grid(sigmas: torch.Tensor) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    n = sigmas.numel() - 1
    check(sigmas.ndim == 1 and n >= 2 and n % 2 == 0 and bool((sigmas[1:] < sigmas[:-1]).all()) and sigmas[-1] == 0,
          f"the teacher's sigmas must strictly decrease to 0 over an even number of steps, got {sigmas.tolist()}")
    return sigmas


def progressive_loss(teacher, sigmas, data: Data, cfg: DistillConfig = DistillConfig()):
    """One round's loss ``loss_fn(student, batch, generator) -> [batch]``.

    ``teacher`` is a w-conditioned denoiser (the stage-1 student or a previous round) sampled with
    Euler on ``sigmas`` (2K steps, ending in 0); the student gets the grid ``sigmas[::2]`` (K steps).
    With ``x = x0 + sigma_i n`` at a student level ``sigma_i`` (uniform over the K levels) the teacher
    takes two steps to ``x''`` at ``sigma_{i+2}``; the student's target is the x0 prediction whose ONE
    Euler step lands on ``x''``: ``D~ = x - sigma_i (x'' - x) / (sigma_{i+2} - sigma_i)`` (= ``x''`` when
    ``sigma_{i+2} = 0``; Salimans & Ho Alg. 2 in EDM's sigma parameterisation). Weight: EDM's lambda
    (Salimans & Ho use truncated SNR weighting). ``cfg.P_mean`` / ``P_std`` are unused: sigma is on the grid.
    """
    grid = _check_grid(sigmas)

    def loss_fn(student, batch: int, gen: torch.Generator) -> torch.Tensor:
        x0, cond = _split(data(batch, gen))
        dev, dt = x0.device, x0.dtype
        g = grid.to(dev, dt)
        i = 2 * torch.randint(0, (g.numel() - 1) // 2, (batch,), generator=gen, device=dev)
        s0, s1, s2 = g[i], g[i + 1], g[i + 2]
        x = x0 + bcast(s0, x0) * torch.randn(x0.shape, generator=gen, device=dev, dtype=dt)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(batch, generator=gen, device=dev, dtype=dt)
        with torch.no_grad():                                   # two teacher steps, a fixed target
            x1 = euler_step(teacher(x, s0, **cond, **{cfg.key: w}), x, s0, s1)
            x2 = euler_step(teacher(x1, s1, **cond, **{cfg.key: w}), x1, s1, s2)  # s1 > 0: only the last level is 0
            target = x - bcast(s0, x) * (x2 - x) / bcast(s2 - s0, x)
        return edm_loss(student, x, s0, target, student.precond, **cond, **{cfg.key: w})
    return loss_fn


def progressive_round(run_dir: str | Path, teacher_path: str | Path, sigmas, data: Data,
                      cfg: DistillConfig = DistillConfig(), loop: LoopConfig = LoopConfig(), *,
                      progress: bool = True, checkpoint_every: int = 256, device: str = "cpu",
                      threads: int | None = None) -> Path:
    """One halving round: distil the checkpoint ``teacher_path`` (Euler on ``sigmas``, 2K steps) into
    a student with the same config and the teacher's initial weights that samples on ``sigmas[::2]``.

    Resumable like :func:`distill_student`; returns the final EMA snapshot. Chain rounds by passing
    the returned path as the next ``teacher_path`` with ``sigmas[::2]``.
    """
    grid = _check_grid(sigmas)
    teacher = checkpoint.load_model(teacher_path, device)
    model_config = registry.config(teacher)
    check(model_config.get("extra_scalar") == cfg.key,
          f"the teacher needs extra_scalar={cfg.key!r}, got {model_config.get('extra_scalar')!r}")
    meta = {"recipe": "progressive", **asdict(cfg), "teacher": str(teacher_path), "sigmas": grid.tolist()}
    init = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    return train(run_dir, model_config, progressive_loss(teacher, grid, data, cfg), loop, meta=meta,
                 checkpoint_every=checkpoint_every, progress=progress, desc=f"progressive {grid.numel() - 1}->"
                 f"{(grid.numel() - 1) // 2}", device=device, threads=threads, init=init)
