"""The measurement operators: forward equals the dense matrix, pinv / project are the pseudo-inverse and
the orthogonal projection onto the row space, misuse refused."""

import pytest
import torch

from guidelab.errors import GuidelabError
from guidelab.inverse import Blur, Downsample, Grayscale, Mask, Matrix

F64 = torch.float64


def _mask():
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[..., 1:3, :] = True
    return Mask(m)


OPERATORS = {
    "mask": _mask,
    "downsample": lambda: Downsample((1, 4, 4), 2),
    "grayscale": lambda: Grayscale((3, 2, 2), channel=0),
    "matrix": lambda: Matrix(torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=F64)),
}


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_forward_pinv_and_projection_are_the_linear_algebra(name):
    op = OPERATORS[name]()
    A = op.matrix()
    x = torch.randn(5, *op.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(op(x).reshape(5, -1), x.reshape(5, -1) @ A.T)
    torch.testing.assert_close(op(x.reshape(5, -1)), op(x))  # the flat view of a sample is accepted
    A_pinv = torch.linalg.pinv(A)
    y = op(x)
    torch.testing.assert_close(op.pinv(y).reshape(5, -1), y.reshape(5, -1) @ A_pinv.T)
    P = op.project(x)
    torch.testing.assert_close(P.reshape(5, -1), x.reshape(5, -1) @ (A_pinv @ A).T)
    torch.testing.assert_close(op.project(P), P)  # idempotent
    torch.testing.assert_close(op(P), y)  # keeps the measurement


def test_blur_is_a_normalised_convolution_without_projection():
    op = Blur((1, 5, 5), 3, 1.0)
    x = torch.ones(2, 1, 5, 5, dtype=F64)
    torch.testing.assert_close(op(x)[:, :, 2, 2], torch.ones(2, 1, dtype=F64))  # interior of a constant image
    torch.testing.assert_close(op(x).reshape(2, -1), x.reshape(2, -1) @ op.matrix().T)
    with pytest.raises(GuidelabError, match="no exact pseudo-inverse"):
        op.project(x)


def test_misuse_is_one_clear_error():
    op = Downsample((1, 4, 4), 2)
    cases = [
        (lambda: op(torch.zeros(2, 1, 4, 5)), "built for samples of shape \\[1, 4, 4\\]"),
        (lambda: op.measurement(torch.zeros(3, 3), 2, torch.zeros(1)), "observation y must have shape"),
        (lambda: op.measurement(torch.full((1, 2, 2), float("nan")), 2, torch.zeros(1)), "NaN"),
        (lambda: Downsample((1, 4, 4), 3), "dividing H and W"),
        (lambda: Mask(torch.tensor([0.0, 0.5])), "only 0 and 1"),
        (lambda: Mask(torch.zeros(3, dtype=torch.bool)), "no value as known"),
        (lambda: Grayscale((1, 4, 4)), "at least 2 channels"),
        (lambda: Matrix(torch.ones(2, 4), shape=(1, 3)), "columns"),
        (lambda: Blur((1, 4, 4), size=2), "odd integer"),
    ]
    for make, message in cases:
        with pytest.raises(GuidelabError, match=message):
            make()
