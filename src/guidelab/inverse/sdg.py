"""Semantic Diffusion Guidance (Liu et al., WACV 2023, arXiv 2112.05744): guidance of an unconditional
model by any noise-aware energy ``F(x, sigma)``; Guided-TTS's norm-based scaling (Kim et al., ICML 2022,
arXiv 2111.11755, Sec. 3.3) as an option.

SDG adds the energy's gradient to the DDPM mean, ``mu + s Sigma grad_x F(x_t, t)`` (ADM's
``condition_mean``, as classifier guidance with ``log p(y | x_t)`` replaced by ``F``). In EDM form
(methods.md §11) the score gets ``s grad F``::

    D~(x; sigma) = D(x; sigma) + s sigma^2 grad_x F(x, sigma)

``F`` is any differentiable function of the *noisy* sample: a classifier's log-probability
(:func:`class_energy`; then this is exactly :func:`guidelab.guidance.classifier`), the cosine
similarity of image embeddings of ``x`` and of the reference noised to the same sigma
(:func:`reference_energy`, SDG's image guidance), a text-embedding similarity, a user function.
Weight convention: guidelab's ``w = 1 + s`` (``w = 1``: no guidance); SDG's ``image_weight`` /
``text_weight`` (their examples: 100 / 160 with 100 respaced steps) are ``s``, applied to F itself.

Guided-TTS's norm-based scaling (``norm="score"``): the gradient is rescaled per sample to the norm of
the unconditional score, ``grad F -> |grad log p(x)| / |grad F| grad F``, so ``s`` (their gradient scale)
is relative to the score at every noise level.

Cost per evaluation: 1 NFE of ``D`` plus one forward and backward pass of ``F``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..denoisers import Guider, bcast
from ..errors import as_sigma, check, check_weight
from ._common import grad

_NORMS = (None, "score")


class EnergyGuided(Guider):
    """``D(x; sigma) + (w - 1) sigma^2 grad_x F(x, sigma, **cond)``; see :func:`energy`."""

    def __init__(
        self,
        denoiser: Callable[..., torch.Tensor],
        F: Callable[..., torch.Tensor],
        w: float | torch.Tensor,
        keys: tuple[str, ...],
        norm: str | None,
        name: str,
    ):
        check_weight(w)
        check(callable(F), f"the energy F must be a callable F(x, sigma, **cond) -> [batch], got {type(F).__name__}")
        check(norm in _NORMS, f"unknown norm {norm!r}; allowed: None, 'score' (Guided-TTS)")
        self.denoiser, self.F, self.w, self.keys, self.norm, self.name = denoiser, F, w, keys, norm, name

    def _split(self, cond: dict) -> tuple[dict, dict]:
        for k in self.keys:
            check(k in cond, f"{self.name} needs cond[{k!r}]")
        return ({k: v for k, v in cond.items() if k not in self.keys}, {k: cond[k] for k in self.keys})

    def unguided(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.denoiser(x, sigma, **self._split(cond)[0])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        D = self.unguided(x, sigma, **cond)
        if not isinstance(self.w, torch.Tensor) and self.w == 1:
            return D
        sigma = as_sigma(sigma, x)
        theirs = self._split(cond)[1]
        _, g = grad(lambda xg: self.F(xg, sigma.clone(), **theirs), x)
        g = g.to(D)
        if self.norm == "score":  # Guided-TTS: |score| / |grad F|
            score = (D - x) / bcast(sigma, D) ** 2
            gn = g.flatten(1).norm(dim=1)
            unit = g / bcast(torch.where(gn > 0, gn, torch.ones_like(gn)), g)  # a zero gradient adds nothing
            g = unit * bcast(score.flatten(1).norm(dim=1), g)
        s = self.w - 1 if not isinstance(self.w, torch.Tensor) else bcast(self.w.to(D) - 1, D)
        return D + s * bcast(sigma, D) ** 2 * g  # score + s grad F (SDG / ADM condition_mean)

    def __repr__(self) -> str:
        return f"{self.name}(w={self.w}{', norm=' + self.norm if self.norm else ''})"


def energy(
    denoiser: Callable[..., torch.Tensor],
    F: Callable[..., torch.Tensor],
    w: float | torch.Tensor,
    *,
    keys: tuple[str, ...] = (),
    norm: str | None = None,
) -> EnergyGuided:
    """Guidance of ``denoiser`` by the energy ``F(x, sigma, **cond) -> [batch]`` at weight ``w = 1 + s``.

    ``keys``: condition keys ``F`` consumes (removed before calling ``denoiser``), e.g. ``("label",)``;
    ``norm="score"``: Guided-TTS's norm-based scaling. ``w``: a number or a per-sample [batch] tensor.
    """
    return EnergyGuided(denoiser, F, w, tuple(keys), norm, "energy")


def class_energy(clf: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``F(x, sigma, label) = log softmax(clf(x, sigma))[label]``: classifier guidance as an energy."""

    def F(x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | int) -> torch.Tensor:
        logp = clf(x, sigma).log_softmax(1)
        label = torch.as_tensor(label, device=x.device)
        label = label.expand(x.shape[0]) if label.ndim == 0 else label
        ok = label.shape == (x.shape[0],) and not label.is_floating_point()
        check(
            ok and bool(((label >= 0) & (label < logp.shape[1])).all()),
            f"the class label must be an int or [batch] ints in [0, {logp.shape[1]})",
        )
        return logp.gather(1, label.long()[:, None])[:, 0]

    return F


def reference_energy(
    encoder: Callable[..., torch.Tensor], ref: torch.Tensor, ref_noise: torch.Tensor | None = None
) -> Callable[..., torch.Tensor]:
    """SDG's image-content energy ``F(x, sigma) = cos(E(x, sigma), E(ref + sigma n, sigma))``.

    ``encoder(x, sigma) -> [B, ...]`` a noise-aware image encoder; ``ref`` one sample or [B, ...];
    ``ref_noise``: the standard normal ``n`` that noises the reference (fixed per run; None: zeros, the
    clean reference). SDG draws fresh noise at every step, which would tie the guided denoiser to a
    random state; pass a per-sample ``n`` to reproduce that in expectation.
    """

    def F(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        r = ref.expand_as(x) if ref.shape == x.shape[1:] else ref
        n = torch.zeros_like(r) if ref_noise is None else ref_noise.expand_as(r)
        with torch.no_grad():
            target = encoder(r + bcast(sigma, r) * n, sigma).flatten(1)
        feat = encoder(x, sigma).flatten(1)
        return torch.nn.functional.cosine_similarity(feat, target, dim=1)

    return F


def guided_tts(
    denoiser: Callable[..., torch.Tensor], clf: Callable[..., torch.Tensor], w: float | torch.Tensor, *, key: str = "label"
) -> EnergyGuided:
    """Classifier guidance with Guided-TTS's norm-based scaling: gradient scale ``s = w - 1``
    relative to the unconditional score's norm (their Sec. 3.3)."""
    out = EnergyGuided(denoiser, _renamed(class_energy(clf), key), w, (key,), "score", "guided_tts")
    return out


def _renamed(F: Callable[..., torch.Tensor], key: str) -> Callable[..., torch.Tensor]:
    return F if key == "label" else (lambda x, sigma, **c: F(x, sigma, c[key]))
