"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download) as the built-in image data.

Pixels 0..16 are scaled to [-1, 1]. The train/test split is fixed and uses no random numbers: within
each class, every 5th image in file order (occurrences 4, 9, 14, ...) is a test image, so the split
is stratified (about 20 % test) and identical on every machine and library version.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import GuidelabError, check
from .folder import ImageData

DIGITS_CLASSES = [str(i) for i in range(10)]
SPLITS = ("train", "test", "all")


def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise GuidelabError("the digits data set needs scikit-learn: pip install 'guidelab[data]'") from None
    d = load_digits()
    return np.asarray(d.images, dtype=np.float32), np.asarray(d.target, dtype=np.int64)


def held_out(labels: np.ndarray) -> np.ndarray:
    """Boolean [N]: the fixed test split (every 5th occurrence of each class, 0-based index 4, 9, ...)."""
    rank = np.zeros_like(labels)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    return rank % 5 == 4


def digits(split: str = "train") -> ImageData:
    """The digits: images [N, 1, 8, 8] in [-1, 1], labels [N] in 0..9. ``split``: train, test or all."""
    check(split in SPLITS, f"unknown digits split {split!r}; allowed: {list(SPLITS)}")
    images, labels = _load()
    if split != "all":
        keep = held_out(labels) == (split == "test")
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(images / 8.0 - 1.0)[:, None]  # 0..16 -> [-1, 1]
    return ImageData(x.contiguous(), torch.from_numpy(labels.copy()), list(DIGITS_CLASSES))
