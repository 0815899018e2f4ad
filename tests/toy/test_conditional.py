import pytest
import torch

from guidelab import toy
from guidelab.errors import GuidelabError


def test_conditional_tree_is_each_class_exactly():
    W = toy.conditional_tree(dtype=torch.float64)
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.linspace(0.05, 2.0, 12, dtype=torch.float64)
    label = torch.tensor([0, 1, 2] * 4)
    out = W(x, sigma, label=label)
    for k, c in enumerate("A B AB".split()):
        m = label == k
        torch.testing.assert_close(out[m], toy.tree(c, dtype=torch.float64)(x[m], sigma[m]), rtol=0, atol=0)
    torch.testing.assert_close(W.logp(x, sigma, 1), toy.tree("B", dtype=torch.float64).logp(x, sigma))
    assert W.null_label == 2 and W.num_classes == 2
    with pytest.raises(GuidelabError, match="label"):
        W(x, sigma, label=torch.full((12,), 3))


def test_leaky_labels_mix_the_other_class_in():
    W = toy.conditional_tree(leak=0.3, dtype=torch.float64)
    A, B = toy.tree("A", dtype=torch.float64), toy.tree("B", dtype=torch.float64)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.logaddexp(
        A.logp(x, 0.3) + torch.log(torch.tensor(0.7, dtype=torch.float64)),
        B.logp(x, 0.3) + torch.log(torch.tensor(0.3, dtype=torch.float64)),
    )
    torch.testing.assert_close(W.logp(x, 0.3, 0), expected)
    torch.testing.assert_close(W(x, 0.3, label=2), toy.tree("AB", dtype=torch.float64)(x, 0.3))
