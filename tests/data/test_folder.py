import numpy as np
import pytest
import torch
from PIL import Image

from guidelab.data import image_folder
from guidelab.errors import GuidelabError


def _save(path, a):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def test_class_folders_labels_and_values(tmp_path):
    a = np.zeros((4, 4, 3), np.uint8)
    a[0, 0] = [255, 0, 0]
    _save(tmp_path / "cat" / "x.png", a)
    _save(tmp_path / "dog" / "y.png", np.full((4, 4, 3), 255, np.uint8))
    _save(tmp_path / "dog" / "z.jpg", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    d = image_folder(tmp_path)
    assert d.classes == ["cat", "dog"] and d.labels.tolist() == [0, 1, 1]
    assert d.images.shape == (3, 3, 4, 4)
    assert d.images[0, :, 0, 0].tolist() == [1, -1, -1] and d.images[0, :, 1, 1].tolist() == [-1, -1, -1]
    assert torch.all(d.images[1] == 1)
    g = image_folder(tmp_path, channels=1)
    assert g.images.shape == (3, 1, 4, 4)


def test_unlabelled_and_resize(tmp_path):
    _save(tmp_path / "a.png", np.full((6, 6), 255, np.uint8))
    _save(tmp_path / "b.png", np.full((3, 5), 0, np.uint8))
    with pytest.raises(GuidelabError, match="different sizes.*resolution"):
        image_folder(tmp_path, channels=1)
    d = image_folder(tmp_path, resolution=8, channels=1)
    assert d.labels is None and d.images.shape == (2, 1, 8, 8)
    assert torch.allclose(d.images[0], torch.ones(1, 8, 8)) and torch.allclose(d.images[1], -torch.ones(1, 8, 8))


def test_errors(tmp_path):
    with pytest.raises(GuidelabError, match="no images"):
        image_folder(tmp_path)
    with pytest.raises(GuidelabError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(GuidelabError, match="cannot read image .*bad.png") as e:
        image_folder(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(GuidelabError, match="channels"):
        image_folder(tmp_path, channels=2)
