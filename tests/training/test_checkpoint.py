import os
import pickle

import pytest
import torch

from guidelab.errors import GuidelabError
from guidelab.models import ToyMLP
from guidelab.training import checkpoint, load, load_model, save, save_model


def test_round_trip(tmp_path):
    tensors = {
        "a": torch.arange(6.0).view(2, 3),
        "b/c": torch.tensor([1, 2], dtype=torch.int64),
        "view": torch.arange(10.0)[::2],
    }  # non-contiguous input is fine
    config = {"model": {"name": "X", "n": 3}, "lr": 0.01, "betas": [0.9, 0.99], "text": "é", "flag": None}
    save(tmp_path / "c.safetensors", tensors, config)
    t, c = load(tmp_path / "c.safetensors")
    assert c == config
    assert t.keys() == tensors.keys() and all(torch.equal(t[k], tensors[k]) for k in t)


def test_model_round_trip(tmp_path):
    torch.manual_seed(0)
    m = ToyMLP(hidden=16, num_classes=2)
    with torch.no_grad():
        m.gain.fill_(0.5)
    path = save_model(tmp_path / "m.safetensors", m, step=7)
    m2 = load_model(path)
    assert not m2.training and not any(p.requires_grad for p in m2.parameters())
    assert m2.checkpoint_info["step"] == 7
    x, sigma = torch.randn(4, 2), torch.full((4,), 0.3)
    with torch.no_grad():  # the energy model needs no autograd
        assert torch.equal(m2(x, sigma, torch.tensor([0, 1, 2, 0])), m.eval()(x, sigma, torch.tensor([0, 1, 2, 0])))


def test_atomic_write_keeps_old_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save(path, {"a": torch.zeros(3)}, {"v": 1})

    def crash(*args):
        raise KeyboardInterrupt  # killed between writing the temp file and renaming it

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save(path, {"a": torch.ones(3)}, {"v": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]
    t, c = load(path)
    assert c == {"v": 1} and torch.equal(t["a"], torch.zeros(3))


def test_config_must_be_json(tmp_path):
    with pytest.raises(GuidelabError):
        save(tmp_path / "c.safetensors", {"a": torch.zeros(1)}, {"x": object()})
    assert not any(tmp_path.iterdir())


def _bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save(good, {"a": torch.zeros(100)}, {"v": 1})
    data = good.read_bytes()
    import safetensors.torch

    files = {
        "pickle": pickle.dumps({"a": [1, 2, 3]}),
        "text": b"hello, this is a text file\n" * 4,
        "empty": b"",
        "truncated": data[:-50],
        "header_only": data[:20],
        "no_config": safetensors.torch.save({"a": torch.zeros(2)}),
    }
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.bin"
        paths[name].write_bytes(content)
    paths["missing"] = tmp_path / "missing.safetensors"
    return paths


@pytest.mark.parametrize("kind", ["pickle", "text", "empty", "truncated", "header_only", "no_config", "missing"])
def test_not_a_checkpoint_is_one_clear_line(tmp_path, kind):
    path = _bad_files(tmp_path)[kind]
    for fn in (load, load_model):
        with pytest.raises(GuidelabError) as e:
            fn(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg


def test_pickle_is_named_and_never_loaded(tmp_path):
    with pytest.raises(GuidelabError, match="pickle"):
        load(_bad_files(tmp_path)["pickle"])


def test_model_config_mismatch(tmp_path):
    m = ToyMLP(hidden=16)
    save(tmp_path / "a.safetensors", dict(m.state_dict()), {"model": {"name": "ToyMLP", "hidden": 8}})
    save(tmp_path / "b.safetensors", dict(m.state_dict()), {"model": {"name": "Unknown"}})
    save(tmp_path / "c.safetensors", {"x": torch.zeros(1)}, {"model": {"name": "ToyMLP"}})
    for name in ("a", "b", "c"):
        with pytest.raises(GuidelabError) as e:
            load_model(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(e.value)


def test_atomic_write_helper(tmp_path):
    p = checkpoint.atomic_write(tmp_path / "sub" / "f.bin", b"abc")
    assert p.read_bytes() == b"abc" and [q.name for q in p.parent.iterdir()] == ["f.bin"]
    mask = os.umask(0o022)
    try:  # the permissions of a plain open(), not mkstemp's owner-only 0600
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"")
        q = checkpoint.atomic_write(tmp_path / "g.bin", lambda f: f.write(b"x"))
        assert (q.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(mask)
