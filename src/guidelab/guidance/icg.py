"""Independent condition guidance, ICG (Sadat et al., "No Training, No Problem", ICLR 2025, arXiv 2407.02687).

``D = D(x; sigma, y_hat) + w (D(x; sigma, y) - D(x; sigma, y_hat))`` with ``y_hat`` drawn independently
of x (the paper's ICG equation): the conditional network with a *random* condition stands in for the
unconditional one, so models trained without label dropout (EDM, EDM2) get CFG at CFG's cost.
Paper convention is the same (``w = 1``: no guidance).

``y_hat`` is drawn afresh at every evaluation: a uniform random label (``kind="label"``) or a Gaussian
vector with each sample's own mean and std of the real embedding (``kind="gaussian"``, for
continuous condition embeddings). Pass ``seeds`` (one per sample) for per-sample, batch-size
invariant draws; the draws are a hash of (seed, sigma), so the guider keeps no state between runs.
"""

from __future__ import annotations

import torch

from ..errors import check
from ._base import Branch, Guided, PerCall, draw_labels, draw_normal

_SALT = 0x1C6


def icg(denoiser, w, *, key: str = "label", kind: str = "label", num_classes: int | None = None,
        seeds=None) -> Guided:
    """ICG of ``denoiser`` at weight ``w``; both branches in one batched call.

    ``kind="label"``: ``cond[key]`` is a [batch] integer label; ``y_hat`` uniform over
    ``num_classes`` (default ``denoiser.num_classes``). ``kind="gaussian"``: ``cond[key]`` is a
    [batch, ...] embedding; ``y_hat = mean + std * n`` per sample.
    """
    check(kind in ("label", "gaussian"), f"icg kind must be 'label' or 'gaussian', got {kind!r}")
    seeds = None if seeds is None else [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
    if kind == "label":
        if num_classes is None:
            num_classes = getattr(denoiser, "num_classes", None)
        check(isinstance(num_classes, int) and num_classes >= 2,
              f"icg with random labels needs num_classes >= 2 (pass num_classes=...), got {num_classes!r}")

        def y_hat(y, x, sigma):
            check(isinstance(y, torch.Tensor), f"icg needs cond[{key!r}] as a [batch] label tensor")
            return draw_labels(seeds, sigma, num_classes, _SALT, y)
    else:
        def y_hat(y, x, sigma):
            check(isinstance(y, torch.Tensor) and y.ndim >= 2, f"icg kind='gaussian' needs cond[{key!r}] as a [batch, ...] embedding")
            flat = y.flatten(1)
            n = draw_normal(seeds, sigma, y.shape[1:], _SALT, y)
            shape = (-1,) + (1,) * (y.ndim - 1)
            return flat.mean(1).reshape(shape) + flat.std(1).reshape(shape) * n

    return Guided(Branch(denoiser), Branch(denoiser, {key: PerCall(y_hat)}), w, "icg")
