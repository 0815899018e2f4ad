import os

import pytest
import torch

from guidelab import toy

# The tests make many small tensor ops: torch's intra-op threads only add synchronisation (on a busy
# 2-core machine each call becomes up to ~50x slower), so every test process runs on one thread.
torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """With pytest-xdist installed, run on 2 worker processes (fewer on a 1-core machine); ``-n 0`` or
    ``-p no:xdist`` runs in one process, ``-n N`` on N. Whole modules go to one worker (``--dist
    loadscope``), so a module-scoped fixture (a trained model) is built once."""
    if not config.pluginmanager.has_plugin("xdist") or hasattr(config, "workerinput"):
        return
    if config.option.numprocesses is None and not config.option.usepdb:
        n = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        config.option.numprocesses = n if n > 1 else None
    if config.option.numprocesses and config.option.dist == "no":
        config.option.dist = "loadscope"


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """No test reads or writes the user's model cache (``$GUIDELAB_CACHE``); each process gets its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUIDELAB_CACHE", str(tmp_path_factory.mktemp("guidelab-cache")))
        yield


@pytest.fixture(scope="session")
def tree_a64():
    return toy.tree("A", dtype=torch.float64)


@pytest.fixture(scope="session")
def tree_ab64():
    return toy.tree("AB", dtype=torch.float64)
