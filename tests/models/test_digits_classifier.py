import pytest
import torch

from guidelab.data import digits
from guidelab.errors import GuidelabError
from guidelab.guidance.classifier import class_log_prob_grad
from guidelab.models import build, config
from guidelab.models.digits import DigitsClassifier, train_digits_classifier


@pytest.fixture(scope="module")
def test_set():
    return digits("test")


def _acc(m, x, labels, sigma=None):
    with torch.no_grad():
        return (m(x, sigma).argmax(1) == labels).float().mean().item()


def test_clean_classifier_and_features(test_set):
    m = train_digits_classifier(steps=150, batch=64)
    assert _acc(m, test_set.images, test_set.labels) > 0.9   # held-out split
    ex = m.extractor()
    f = ex(test_set.images)
    assert f.shape == (len(test_set), 128) and ex.info["weights_sha256"] == m.weights_sha256()
    # Features separate the classes: nearest class mean in feature space is mostly right.
    means = torch.stack([f[test_set.labels == c].mean(0) for c in range(10)])
    assert (torch.cdist(f, means).argmin(1) == test_set.labels).float().mean() > 0.85
    assert build(config(m)).config() == m.config()
    # Deterministic given the seed.
    def small():
        torch.manual_seed(1)
        return DigitsClassifier(channels=4, features=8)
    a, b = (train_digits_classifier(small(), steps=5, batch=8) for _ in range(2))
    assert a.weights_sha256() == b.weights_sha256()


def test_noise_aware_classifier(test_set):
    m = train_digits_classifier(DigitsClassifier(noise_aware=True, channels=16), steps=200, batch=64)
    g = torch.Generator().manual_seed(0)
    n = torch.randn(test_set.images.shape, generator=g)
    low = _acc(m, test_set.images + 0.2 * n, test_set.labels, 0.2)
    high = _acc(m, test_set.images + 10 * n, test_set.labels, 10.0)
    assert low > 0.8 and high < low
    x = test_set.images[:4]
    assert class_log_prob_grad(m, x, torch.full((4,), 0.5), test_set.labels[:4]).shape == x.shape
    with pytest.raises(GuidelabError, match="noise-aware"):
        m(x)
    with pytest.raises(GuidelabError, match="clean"):
        m.extractor()


def test_digits_classifier_cache(tmp_path, monkeypatch):
    from guidelab.app import digits_cache
    from guidelab.app.digits_cache import default_path, digits_classifier

    monkeypatch.setenv("GUIDELAB_CACHE", str(tmp_path))
    path = default_path(steps=3)
    assert path.parent == tmp_path and not path.exists()
    a = digits_classifier(steps=3)                      # trained, then saved atomically
    assert path.is_file()
    b = digits_classifier(steps=3)                      # loaded: same weights
    assert a.weights_sha256() == b.weights_sha256() == digits_classifier(tmp_path / "again.safetensors", steps=3).weights_sha256()
    ex = digits_cache.extractor(path)
    assert ex.info["weights_sha256"] == a.weights_sha256() and ex(digits("test").images[:5]).shape == (5, 128)
    with pytest.raises(GuidelabError, match="noise_aware=True"):
        digits_classifier(path, noise_aware=True)


def test_classifier_cli(tmp_path):
    from click.testing import CliRunner

    from guidelab.app.cli import main

    out = tmp_path / "clf.safetensors"
    r = CliRunner().invoke(main, ["classifier", "--out", str(out), "--steps", "30", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "test-split accuracy" in r.output
    r = CliRunner().invoke(main, ["classifier", "--out", str(out), "--steps", "30"])
    assert isinstance(r.exception, GuidelabError) and "exists" in str(r.exception)
