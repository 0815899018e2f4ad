import logging
import multiprocessing

import pytest
import torch

import guidelab.threads
import guidelab.training.prefetch
from guidelab.app import demo
from guidelab.errors import GuidelabError
from guidelab.training import load

TINY = {name: {"iters": 6, "batch": 64, "hidden": 8, "depth": 1, "snapshot_every": 3} for name in demo.MODELS}


@pytest.fixture
def spare_core(monkeypatch):
    """A machine with a core to spare, and runs long enough for the second process (all of these)."""
    monkeypatch.setattr(guidelab.threads, "available_cores", lambda: 2)
    monkeypatch.setattr(guidelab.training.prefetch, "PREFETCH_MIN_SAMPLES", 1)
    monkeypatch.delenv("GUIDELAB_PREFETCH", raising=False)
    assert torch.get_num_threads() == 1  # tests/conftest.py


def test_small_models_train_in_a_second_process_with_the_same_weights(tmp_path, spare_core, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="guidelab"):
        side = demo.train_models(tmp_path / "side", progress=False, **TINY)
    assert "in a second process" in caplog.text
    monkeypatch.setenv("GUIDELAB_PREFETCH", "0")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="guidelab"):
        here = demo.train_models(tmp_path / "here", progress=False, **TINY)
    assert "second process" not in caplog.text
    for name in demo.MODELS:
        a, b = load(side[name].checkpoint_path)[0], load(here[name].checkpoint_path)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not multiprocessing.active_children()


def _broken(out, cfgs):
    raise RuntimeError("side training broke")


def test_a_failing_second_process_raises(tmp_path, spare_core, monkeypatch):
    monkeypatch.setattr(demo, "_train_side", _broken)
    with pytest.raises(GuidelabError, match="second process failed .*GUIDELAB_PREFETCH=0"):
        demo.train_models(tmp_path, progress=False, **TINY)
    assert not multiprocessing.active_children()


def test_no_second_process_without_a_spare_core(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(guidelab.threads, "available_cores", lambda: 1)
    monkeypatch.setattr(guidelab.training.prefetch, "PREFETCH_MIN_SAMPLES", 1)
    with caplog.at_level(logging.INFO, logger="guidelab"):
        demo.train_models(tmp_path, progress=False, **TINY)
    assert "second process" not in caplog.text
