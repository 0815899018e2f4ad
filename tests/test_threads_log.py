import io
import logging

import pytest
import torch

from guidelab import log, threads
from guidelab.errors import GuidelabError


def test_choose_threads_small_models_one_thread_and_choice_logged():
    assert threads.choose_threads(parameters=100_000)[0] == 1
    assert threads.choose_threads(None)[0] == 1
    assert threads.choose_threads(3, parameters=100_000) == (3, "asked for")
    assert threads.choose_threads(parameters=10**9, processes=10**6)[0] == 1
    with pytest.raises(GuidelabError, match="threads"):
        threads.choose_threads(0)
    stream, before = io.StringIO(), torch.get_num_threads()
    handler = log.enable(stream=stream)
    try:
        assert threads.set_threads(parameters=1000) == 1 and torch.get_num_threads() == 1
        assert "using 1 CPU thread (small model" in stream.getvalue()
        log.enable(quiet=True, stream=stream)
        assert logging.getLogger("guidelab").level == logging.WARNING
    finally:
        torch.set_num_threads(before)
        logging.getLogger("guidelab").removeHandler(handler)
        for h in [h for h in logging.getLogger("guidelab").handlers if getattr(h, "_guidelab", False)]:
            logging.getLogger("guidelab").removeHandler(h)
    with threads.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
