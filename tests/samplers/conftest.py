"""Fixtures for the sampler tests; k-diffusion's reference samplers come from ``_kdiffusion.py``."""

import pytest
from _kdiffusion import load_sampling  # this folder is on sys.path (pytest rootdir conftest import)


@pytest.fixture(scope="session")
def ksampling():
    return load_sampling()
