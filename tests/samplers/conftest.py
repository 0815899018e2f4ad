"""Fixtures for the sampler tests; k-diffusion's reference samplers come from ``_kdiffusion.py``."""

import pytest
import torch

from _kdiffusion import load_sampling  # this folder is on sys.path (pytest rootdir conftest import)

# The exact worlds evaluate many tiny matmuls: on a busy 2-core machine torch's intra-op threads
# make each call ~50x slower (spinning threads), so these tests run single-threaded.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ksampling():
    return load_sampling()
