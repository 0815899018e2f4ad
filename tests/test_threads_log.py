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


def test_held_lines_come_out_at_release_and_are_dropped_on_discard():
    stream = io.StringIO()
    logger = logging.getLogger("guidelab")
    try:
        log.enable(stream=stream, hold=60)
        log.get_logger("x").info("phase one")
        assert stream.getvalue() == ""  # held
        log.discard()
        log.get_logger("x").info("phase two")
        log.release()
        assert stream.getvalue() == "phase two\n"
        log.get_logger("x").info("after")  # released: straight through
        assert stream.getvalue().endswith("after\n")
        log.enable(stream=stream, hold=60)
        log.get_logger("x").info("held")
        log.get_logger("x").warning("a warning")  # a warning releases what is held, in order
        assert stream.getvalue().endswith("held\na warning\n")
        log.enable(stream=stream, hold=0.05)
        log.get_logger("x").info("timer")
        import time

        for _ in range(200):  # the timer releases it without any call
            if stream.getvalue().endswith("timer\n"):
                break
            time.sleep(0.01)
        assert stream.getvalue().endswith("timer\n")
    finally:
        for h in [h for h in logger.handlers if getattr(h, "_guidelab", False)]:
            logger.removeHandler(h)
