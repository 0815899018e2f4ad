"""Metrics from class predictions: Inception score and accuracy against a classifier."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..errors import check


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception score (Salimans et al. 2016) from class probabilities ``probs`` [N, C]: (mean, std).

    IS = exp(E_x KL(p(y|x) || p(y))), with p(y) the mean prediction, over ``splits`` equal
    consecutive splits (the original protocol; ``splits=1`` for one estimate).
    """
    check(isinstance(probs, torch.Tensor) and probs.ndim == 2, "probs must be a tensor of shape [N, C]")
    check(isinstance(splits, int) and 1 <= splits <= probs.shape[0], f"splits must be in [1, N={probs.shape[0]}], got {splits!r}")
    p = probs.double()
    check(
        bool((p >= 0).all()) and bool(torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-4)),
        "probs must be non-negative rows summing to 1 (apply softmax to logits first)",
    )
    scores = []
    for part in p.chunk(splits):
        py = part.mean(0, keepdim=True)
        # xlogy: 0 log 0 = 0 for classes with zero probability
        kl = (torch.xlogy(part, part) - torch.xlogy(part, py)).sum(1)
        scores.append(math.exp(kl.mean().item()))
    mean = sum(scores) / len(scores)
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))


@torch.no_grad()
def class_accuracy(
    classifier: Callable[..., torch.Tensor], x: torch.Tensor, labels: int | torch.Tensor, *, batch: int = 4096, **kwargs: Any
) -> float:
    """Share of samples ``x`` [N, ...] whose argmax class under ``classifier(x, **kwargs)`` (logits or
    probabilities [N, C]) equals ``labels`` (an int or [N] ints): do guided samples show their class?"""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.ndim == 0:
        labels = labels.expand(x.shape[0])
    check(labels.shape == (x.shape[0],), f"labels must be an int or have shape [{x.shape[0]}], got {list(labels.shape)}")
    pred = torch.cat([classifier(c, **kwargs).argmax(1).cpu() for c in x.split(batch)])
    return (pred == labels).double().mean().item()
