"""Sampling a guidance-distilled student (:mod:`guidelab.training.distill`): the student at a weight, and
what its checkpoint says about how it must be sampled. Imports nothing of the recipes, so the guider
registry can read it."""

from __future__ import annotations

from typing import Any, Callable

import torch


def distilled_denoiser(
    student: Callable[..., torch.Tensor], w: float | torch.Tensor, *, key: str = "w"
) -> Callable[..., torch.Tensor]:
    """The student at guidance weight ``w`` (a number or a [batch] tensor) as a plain denoiser.

    ``D(x, sigma, **cond) = student(x, sigma, **cond, w=w)``: one network evaluation per call, so a
    sampler pays one evaluation per step instead of the teacher's two.
    """

    def D(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        wt = torch.as_tensor(w, dtype=x.dtype, device=x.device)
        return student(x, sigma, **cond, **{key: wt.expand(x.shape[0]) if wt.ndim == 0 else wt})

    return D


def distilled_info(model: object) -> dict | None:
    """A loaded student's ``{"key", "w_min", "w_max", "sampler", "sigmas"}`` (None: not a distilled student).

    ``key`` is the guidance-weight keyword (:func:`distilled_denoiser`); a progressive (stage-2) student
    must be sampled with ``sampler`` (``"euler"``, i.e. deterministic DDIM) on exactly ``sigmas`` (a list
    ending in 0); a stage-1 student (``sigmas`` None) with any sampler.
    """
    info = getattr(model, "checkpoint_info", None) or {}
    d = (info.get("meta") or {}).get("distilled")
    return dict(d) if isinstance(d, dict) else None
