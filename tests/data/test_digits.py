import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from guidelab.data import digits
from guidelab.errors import GuidelabError


def test_digits_shapes_range_and_split():
    tr, te, al = digits("train"), digits("test"), digits("all")
    assert al.images.shape == (1797, 1, 8, 8) and al.images.dtype == torch.float32
    assert len(tr) + len(te) == 1797 and al.num_classes == 10
    assert al.images.min() == -1 and al.images.max() == 1
    # Pixel values are the raw 0..16 counts mapped affinely.
    raw = load_digits().images
    assert torch.allclose(al.images[:, 0], torch.from_numpy((raw / 8 - 1).astype(np.float32)))
    # Stratified ~20 % test split, every class on both sides, disjoint and covering all images.
    for c in range(10):
        n_tr, n_te = int((tr.labels == c).sum()), int((te.labels == c).sum())
        assert n_te == (n_tr + n_te) // 5
    rows = lambda d: {tuple(r) for r in d.images.flatten(1).tolist()}
    assert len(rows(tr) & rows(te)) < 5  # only exact duplicate images in the raw data may coincide
    # Fixed: the same split every time.
    assert torch.equal(digits("test").images, te.images) and torch.equal(digits("test").labels, te.labels)


def test_digits_bad_split():
    with pytest.raises(GuidelabError, match="allowed"):
        digits("val")
