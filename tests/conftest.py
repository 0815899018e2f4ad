import pytest
import torch

from guidelab import toy


@pytest.fixture(scope="session")
def tree_a64():
    return toy.tree("A", dtype=torch.float64)


@pytest.fixture(scope="session")
def tree_ab64():
    return toy.tree("AB", dtype=torch.float64)
