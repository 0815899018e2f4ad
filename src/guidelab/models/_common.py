"""Pieces the networks share."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import check


def check_extra_scalar(extra_scalar: object) -> None:
    """``extra_scalar`` (the name of one more per-sample scalar input, e.g. GFT's ``beta``) must be None or a
    keyword name other than the networks' own conditioning keys."""
    check(
        extra_scalar is None
        or (
            isinstance(extra_scalar, str) and extra_scalar.isidentifier() and extra_scalar not in ("label", "noise_embed_offset")
        ),
        f"extra_scalar must be None or a keyword name other than label / noise_embed_offset, got {extra_scalar!r}",
    )


def one_hot_label(label: torch.Tensor | int | None, num_classes: int, x: torch.Tensor) -> torch.Tensor | None:
    """Validated one-hot labels [batch, num_classes + 1]; ``label=None`` is the null label ``num_classes``.

    Returns None for an unconditional network (``num_classes = 0``), which must not be given a label.
    """
    if not num_classes:
        check(label is None, "this model is unconditional (num_classes=0) but was given a label")
        return None
    n = x.shape[0]
    label = torch.as_tensor(num_classes if label is None else label, device=x.device)
    if label.ndim == 0:
        label = label.expand(n)
    check(
        label.shape == (n,) and not label.is_floating_point() and not label.is_complex(),
        f"label must be an integer tensor of shape [batch]=[{n}], got {label.dtype} {list(label.shape)}",
    )
    check(
        bool(((label >= 0) & (label <= num_classes)).all()),
        f"labels must lie in [0, {num_classes}] ({num_classes} = null), got {label.tolist()[:8]}",
    )
    return nn.functional.one_hot(label.long(), num_classes + 1).to(x.dtype)
