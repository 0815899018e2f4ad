"""Independent condition guidance; the method's documentation is :func:`icg`'s docstring."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..errors import GuidelabError, check
from ._base import Branch, Guided, PerCall, draw_labels, draw_normal, draw_seeds
from .protocols import Run
from .weight_schedule import Weight

_SALT = 0x1C6


def _seed_list(seeds: Sequence[int] | torch.Tensor | None) -> list[int] | None:
    return None if seeds is None else [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]


def icg(
    denoiser: Callable[..., torch.Tensor],
    w: Weight,
    *,
    key: str | None = None,
    kind: str | None = None,
    num_classes: int | None = None,
    seeds: Sequence[int] | torch.Tensor | None = None,
) -> Guided:
    """Independent condition guidance, ICG (Sadat et al., "No Training, No Problem", ICLR 2025,
    arXiv 2407.02687) of ``denoiser`` at weight ``w``; both branches in one batched call.

    ``D = D(x; sigma, y_hat) + w (D(x; sigma, y) - D(x; sigma, y_hat))`` with ``y_hat`` drawn independently
    of x (the paper's ICG equation): the conditional network with a *random* condition stands in for the
    unconditional one, so models trained without label dropout (EDM, EDM2) get CFG at CFG's cost. Paper
    convention is the same (``w = 1``: no guidance).

    ``y_hat`` is drawn afresh at every evaluation. ``kind="label"``: ``cond[key]`` is a [batch] integer
    label; ``y_hat`` uniform over ``num_classes``. ``kind="gaussian"``: ``cond[key]`` is a [batch, ...]
    embedding; ``y_hat = mean + std * n`` with each sample's own mean and std of the real embedding.
    Defaults from the denoiser's declared ``condition`` (:class:`~guidelab.guidance.Condition`): ``key``,
    ``num_classes``, and ``kind = "gaussian"`` when it declares no classes (a continuous embedding).

    Randomness: with ``seeds`` (one per sample) or, by default, the sampler run's per-sample seeds (a
    ``SampleNoise`` or ``BrownianNoise`` passed as ``noise=``), the draw of sample *i* is a hash of
    (its seed, its sigma): batch-size invariant, no state. Without seeds (no run, or noise without
    seeds) the draws come fresh from torch's global generator.
    """
    condition = getattr(denoiser, "condition", None)
    key = key if key is not None else condition.key if condition is not None else "label"
    if kind is None:
        kind = "gaussian" if condition is not None and condition.num_classes is None and num_classes is None else "label"
    check(kind in ("label", "gaussian"), f"icg kind must be 'label' or 'gaussian', got {kind!r}")
    seeds = _seed_list(seeds)
    if kind == "label":
        if num_classes is None and condition is not None:
            num_classes = condition.num_classes
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise GuidelabError(f"icg with random labels needs num_classes >= 2 (pass num_classes=...), got {num_classes!r}")

        def y_hat(y: Any, x: torch.Tensor, sigma: torch.Tensor, run: Run | None) -> torch.Tensor:
            check(isinstance(y, torch.Tensor), f"icg needs cond[{key!r}] as a [batch] label tensor")
            return draw_labels(draw_seeds(seeds, run), sigma, num_classes, _SALT, y)
    else:

        def y_hat(y: Any, x: torch.Tensor, sigma: torch.Tensor, run: Run | None) -> torch.Tensor:
            check(
                isinstance(y, torch.Tensor) and y.ndim >= 2,
                f"icg kind='gaussian' needs cond[{key!r}] as a [batch, ...] embedding",
            )
            flat = y.flatten(1)
            n = draw_normal(draw_seeds(seeds, run), sigma, y.shape[1:], _SALT, y)
            shape = (-1,) + (1,) * (y.ndim - 1)
            return flat.mean(1).reshape(shape) + flat.std(1).reshape(shape) * n

    return Guided(Branch(denoiser), Branch(denoiser, {key: PerCall(y_hat, with_run=True)}), w, "icg")
