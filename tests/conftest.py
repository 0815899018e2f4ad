import pytest
import torch

from guidelab import toy

# The tests make many small tensor ops: torch's intra-op threads only add synchronisation (on a busy
# 2-core machine each call becomes up to ~50x slower), so the whole suite runs on one thread.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tree_a64():
    return toy.tree("A", dtype=torch.float64)


@pytest.fixture(scope="session")
def tree_ab64():
    return toy.tree("AB", dtype=torch.float64)
