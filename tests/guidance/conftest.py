import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one intra-op thread: the exact worlds are many tiny ops, and on a shared
    machine extra OpenMP threads only spin (measured 10x slower under load); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
